"""Compiling the C++ kernels once per source, jax version and compiler, and registering them with XLA:CPU."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jaxlib

from kernels_cpu import paged_attention, quantized_linear

log = logging.getLogger("jaxserve")

_SOURCES = ("top_candidates.cc", "quantized_linear.cc", "paged_attention.cc")
_HEADERS = ("parallel.h",)
# FFI target name -> the handler symbol its source exports (the quantized linears only where the host CPU has
# AVX2, FMA and F16C).
TARGETS = {"jaxserve_top_candidates": "TopCandidates",
           quantized_linear.PACKED4: "QuantizedLinearPacked4",
           quantized_linear.INT8_ROWS: "QuantizedLinearInt8Rows",
           paged_attention.TARGET: "PagedAttention"}
# -march=native: the build is for this host (and keyed by its CPU's features). -fno-trapping-math: nothing reads
# floating-point exception flags, and under trapping math GCC does not vectorize loops with floor or selects.
_FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-std=c++17", "-shared", "-fPIC", "-w")

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_registered: set[str] = set()


def enabled(target: str = "jaxserve_top_candidates") -> bool:
    """Whether the kernel behind an FFI target is registered in this process (callers pick kernel or reference at
    trace time)."""
    return target in _registered


def enable(folder: str | os.PathLike) -> bool:
    """Builds the kernels into `folder` unless a build for this source, jax and compiler is there, loads them
    and registers them with the CPU backend, once per process. False, with a warning, where that fails;
    False without one under JAXSERVE_CPU_KERNELS=0."""
    global _library
    with _lock:
        if _library is not None:
            return True
        if os.environ.get("JAXSERVE_CPU_KERNELS", "1") == "0":
            return False
        try:
            library = ctypes.CDLL(str(_build(pathlib.Path(folder))))
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", None) or e
            log.warning("C++ kernels for XLA:CPU not built (%s); using the plain-XLA references", detail)
            return False
        for target, symbol in TARGETS.items():
            if hasattr(library, symbol):
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
                _registered.add(target)
        _library = library
        return True


def _compiler() -> str:
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        raise OSError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
    return compiler


def compile_library(sources, output) -> None:
    """Compiles C++ sources into the shared library `output` as the kernels are built (kernels_cpu's headers and
    XLA's FFI headers on the include path). bench/cpu_kernel_ab.py builds other versions of a kernel with it."""
    here = pathlib.Path(__file__).parent
    subprocess.run([_compiler(), *_FLAGS, "-I", jax.ffi.include_dir(), "-I", str(here), *map(str, sources), "-o",
                    str(output)], check=True, capture_output=True, text=True)


def _build(folder: pathlib.Path) -> pathlib.Path:
    here = pathlib.Path(__file__).parent
    key = hashlib.sha256()
    for part in (jax.__version__, jaxlib.__version__, _compiler(), platform.machine(), _cpu_features(), *_FLAGS):
        key.update(part.encode() + b"\0")
    for name in _SOURCES + _HEADERS:
        key.update((here / name).read_bytes())
    target = folder / f"kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes that build at once never load a partial file.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        compile_library([here / n for n in _SOURCES], partial)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _cpu_features() -> str:
    """The host CPU's feature flags (Linux), which -march=native compiles for."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
