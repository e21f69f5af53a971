"""libtpu on a machine without a TPU: the compiler `jaxserve check` and the kernel compile test need.

The wheel jax[tpu] pins for the installed jax goes into a cache folder, never into the environment, and only
the processes that compile for TPU get it on their path (libtpu in a serving process would look for TPUs).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile


def requirement() -> str:
    """What jax[tpu] pins for the installed jax, e.g. "libtpu==0.0.42.*" for jax 0.10.2."""
    pins = [r.split(";")[0].strip() for r in importlib.metadata.requires("jax")
            if r.startswith("libtpu") and 'extra == "tpu"' in r]
    if len(pins) != 1 or "==" not in pins[0]:
        raise RuntimeError(f"jax declares no single libtpu pin for its [tpu] extra: {pins}")
    return pins[0]


def folder() -> pathlib.Path:
    """$JAXSERVE_CACHE_DIR/libtpu-<version> (default ~/.cache/jaxserve), installed there with pip if absent."""
    root = pathlib.Path(os.environ.get("JAXSERVE_CACHE_DIR", pathlib.Path.home() / ".cache" / "jaxserve"))
    pin = requirement()
    target = root / f"libtpu-{pin.split('==')[1].rstrip('*').rstrip('.')}"
    if not (target / "libtpu").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(dir=root))  # install aside, then move: no half folder
        try:
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tmp),
                            pin], check=True)
            tmp.rename(target)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"{pin} (the libtpu that jax {importlib.metadata.version('jax')} pins) could not be "
                               "installed from the package index; compiling for TPU needs it") from e
        except OSError:  # another process installed it first
            pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def environment(extra_path: str | os.PathLike = "") -> dict[str, str]:
    """This process's environment with libtpu (and extra_path) on PYTHONPATH, for a compiling subprocess."""
    paths = [str(folder()), *([str(extra_path)] if extra_path else []), os.environ.get("PYTHONPATH", "")]
    # TPU_WORKER_HOSTNAMES silences libtpu's probe for other hosts of a TPU slice; ALLOW_MULTIPLE_LIBTPU_LOAD
    # lets compiling processes run side by side (without it the second fails on libtpu's lockfile: there is no
    # TPU to share).
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), TPU_WORKER_HOSTNAMES="localhost",
                ALLOW_MULTIPLE_LIBTPU_LOAD="1")


def importable() -> bool:
    return importlib.util.find_spec("libtpu") is not None
