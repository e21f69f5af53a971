"""A/B of two versions of the 4-bit CPU matmul kernel (kernels_cpu/quantized_linear.cc), in one process: each
source is compiled as kernels_cpu/build.py compiles it, registered under its own FFI target, and the two are timed
in turns over SmolLM2-135M's 4-bit shapes (30 layers' worth of distinct weights per call, as a decode step reads
them), so the host's drift between runs does not enter the ratio. Prints the median per matmul of each, B / A,
and the largest difference between their outputs.

    git show HEAD~1:kernels_cpu/quantized_linear.cc > /tmp/a.cc
    python bench/cpu_kernel_ab.py /tmp/a.cc kernels_cpu/quantized_linear.cc
    python bench/cpu_kernel_ab.py A.cc B.cc --rows 1 16 --repeats 15

It is not a test.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import pathlib
import shutil
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels_cpu import build

SHAPES = ((576, 960), (576, 576), (576, 3072), (1536, 576))  # SmolLM2: qkv, o, gate_up, down (in, out)
LAYERS = 30


def register(source: str, name: str, folder: pathlib.Path) -> str:
    """Compiles `source` (beside kernels_cpu's headers) and registers its 4-bit handler as target `name`."""
    library = folder / f"{name}.so"
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    headers = pathlib.Path(build.__file__).parent
    subprocess.run([compiler, *build._FLAGS, "-I", jax.ffi.include_dir(), "-I", str(headers), source, "-o",
                    str(library)], check=True)
    handle = ctypes.CDLL(str(library))
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handle.QuantizedLinearPacked4), platform="cpu")
    return name


def call(target: str, x, codes, scale, offset):
    """x [T, in] @ the 4-bit codes [in / 2, out] with float16 scales and offsets per 32 inputs -> [T, out]."""
    out = jax.ShapeDtypeStruct((x.shape[0], codes.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(target, out)(x, codes, scale, offset, group=np.int64(32), zero=np.int64(0),
                                         has_offset=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 128])
    p.add_argument("--repeats", type=int, default=9, help="timed turns of each (the median is printed)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        targets = [register(src, f"jaxserve_ab_{i}", pathlib.Path(folder)) for i, src in enumerate((args.a, args.b))]
        rng = np.random.default_rng(0)
        print(f"{'in x out':>10} {'rows':>5} {'A us':>8} {'B us':>8} {'B/A':>6} {'max |A-B|':>10}")
        for n_in, n_out in SHAPES:
            weights = [(jnp.asarray(rng.integers(0, 256, (n_in // 2, n_out)), jnp.uint8),
                        jnp.asarray(rng.random((n_in // 32, n_out)) * 0.01, jnp.float16),
                        jnp.asarray(rng.random((n_in // 32, n_out)) * -0.01, jnp.float16)) for _ in range(LAYERS)]
            for rows in args.rows:
                x = jnp.asarray(rng.standard_normal((rows, n_in)), jnp.float32)
                steps = [jax.jit(lambda x, ws, t=t: [call(t, x, *w) for w in ws]) for t in targets]
                outs = [jax.block_until_ready(f(x, weights)) for f in steps]
                diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(*outs))
                times: list[list[float]] = [[], []]
                for _ in range(args.repeats):
                    for i, f in enumerate(steps):
                        start = time.perf_counter()
                        jax.block_until_ready(f(x, weights))
                        times[i].append((time.perf_counter() - start) / LAYERS * 1e6)
                a, b = (float(np.median(t)) for t in times)
                print(f"{n_in:>4} x {n_out:<4} {rows:>5} {a:>8.1f} {b:>8.1f} {b / a:>6.2f} {diff:>10.2e}", flush=True)


if __name__ == "__main__":
    main()
