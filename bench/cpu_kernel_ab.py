"""A/B of two versions of a CPU kernel, in one process: each source is compiled as kernels_cpu/build.py compiles
it, registered under its own FFI target, and the two are timed in turns, so the host's drift between runs (1.5x
on these shared cores) does not enter the ratio. Prints the median per call of each, B / A, and the largest
difference between their outputs.

- `--kernel packed4` (kernels_cpu/quantized_linear.cc): SmolLM2-135M's 4-bit matmuls at several row counts, 30
  layers' worth of distinct weights per timed call, as a decode step reads them.
- `--kernel attention` (kernels_cpu/paged_attention.cc): SmolLM2's attention (9 query / 3 kv heads of 64, pages
  of 16) over decode batches and a prefill chunk (bench/attention.py's batches).

    git show HEAD~1:kernels_cpu/quantized_linear.cc > /tmp/a.cc
    python bench/cpu_kernel_ab.py /tmp/a.cc kernels_cpu/quantized_linear.cc
    python bench/cpu_kernel_ab.py A.cc B.cc --kernel attention --repeats 15

A source's own folder comes first for its `#include "parallel.h"`, so an old version can bring its old header.

It is not a test.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import os
import pathlib
import sys
import tempfile
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from kernels_cpu import build

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attention  # noqa: E402  (bench/attention.py: its batches)

SHAPES = ((576, 960), (576, 576), (576, 3072), (1536, 576))  # SmolLM2: qkv, o, gate_up, down (in, out)
LAYERS = 30
KERNEL = importlib.import_module("kernels_cpu.paged_attention")  # the module (kernels_cpu exports its function)
HANDLERS = {"packed4": "QuantizedLinearPacked4", "attention": "PagedAttention"}
ATTENTION_CASES = (("decode 1 x 200", [1], 200), ("decode 1 x 512", [1], 512), ("decode 16 x 256", [1] * 16, 256),
                   ("prefill 512", [512], 512))


def register(source: str, handler: str, name: str, folder: pathlib.Path) -> str:
    """Compiles `source` (beside kernels_cpu's headers) and registers its `handler` as target `name`."""
    library = folder / f"{name}.so"
    build.compile_library([source], library)
    handle = ctypes.CDLL(str(library))
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(handle, handler)), platform="cpu")
    return name


def call(target: str, x, codes, scale, offset):
    """x [T, in] @ the 4-bit codes [in / 2, out] with float16 scales and offsets per 32 inputs -> [T, out]."""
    out = jax.ShapeDtypeStruct((x.shape[0], codes.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(target, out)(x, codes, scale, offset, group=np.int64(32), zero=np.int64(0),
                                         has_offset=True)


def attend(target: str):
    """kernels_cpu/paged_attention.py's call against FFI target `target` (traced under the patch, so jit keeps it)."""
    def call(*args):
        with mock.patch.object(KERNEL, "TARGET", target):
            return KERNEL.paged_attention(*args, sm_scale=attention.D ** -0.5)
    return jax.jit(call)


def ab(label: str, steps, args, repeats: int, per_call: int) -> None:
    """Times steps[0] and steps[1] on args in turns; prints medians per call (a timed call makes per_call)."""
    outs = [jax.block_until_ready(f(*args)) for f in steps]
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])))
    times: list[list[float]] = [[], []]
    for _ in range(repeats):
        for i, f in enumerate(steps):
            start = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[i].append((time.perf_counter() - start) / per_call * 1e6)
    a, b = (float(np.median(t)) for t in times)
    print(f"{label:>18} {a:>8.1f} {b:>8.1f} {b / a:>6.2f} {diff:>10.2e}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--kernel", choices=sorted(HANDLERS), default="packed4")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 128], help="packed4: activation rows")
    p.add_argument("--repeats", type=int, default=9, help="timed turns of each (the median is printed)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        targets = [register(src, HANDLERS[args.kernel], f"jaxserve_ab_{i}", pathlib.Path(folder))
                   for i, src in enumerate((args.a, args.b))]
        rng = np.random.default_rng(0)
        print(f"{'case':>18} {'A us':>8} {'B us':>8} {'B/A':>6} {'max |A-B|':>10}")
        if args.kernel == "attention":
            for label, q_lens, ctx in ATTENTION_CASES:
                batch = attention.batch(rng, q_lens, ctx, (ctx + attention.PAGE - 1) // attention.PAGE + 1)
                ab(label, [attend(t) for t in targets], batch, args.repeats, 1)
            return
        for n_in, n_out in SHAPES:
            weights = [(jnp.asarray(rng.integers(0, 256, (n_in // 2, n_out)), jnp.uint8),
                        jnp.asarray(rng.random((n_in // 32, n_out)) * 0.01, jnp.float16),
                        jnp.asarray(rng.random((n_in // 32, n_out)) * -0.01, jnp.float16)) for _ in range(LAYERS)]
            for rows in args.rows:
                x = jnp.asarray(rng.standard_normal((rows, n_in)), jnp.float32)
                steps = [jax.jit(lambda x, ws, t=t: [call(t, x, *w) for w in ws]) for t in targets]
                ab(f"{n_in}x{n_out}, {rows} rows", steps, (x, weights), args.repeats, LAYERS)


if __name__ == "__main__":
    main()
