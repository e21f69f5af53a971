"""Lower and serialize every GPU kernel for CUDA without a GPU: `python -m kernels_pallas.check_gpu`.

Each case is exported with `jax.export.export(jit(f), platforms=["cuda"])` and serialized, which runs
the Pallas Triton lowering (block shapes, power-of-two sizes, dtypes); PTX compilation itself needs a
GPU and is not done. Prints one line per case and exits non-zero if any case fails.
"""
import itertools
import sys
from functools import partial

import jax
import jax.numpy as jnp
from jax import export

from . import gpu, grouped_matmul
from .check_runner import run_cases
from .check_tpu import BATCHES, DTYPES, HEADS, PAGE_SIZES, batch_args

# The Triton kernel is a custom call that jax.export does not know to be stable; we accept that.
DISABLED_CHECKS = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
# The GPU lowered for (the H200 of bench/device_check.py). With no GPU attached, jax 0.11+ reads it from the
# abstract mesh in context; 0.10 assumed compute capability 9.0, the H200's, and ignores the mesh's device.
TARGET = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="cuda")


def _export(fn, *args, donate=()):
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("gpu",), abstract_device=TARGET)):
        exp = export.export(jax.jit(fn, donate_argnums=donate), platforms=["cuda"],
                            disabled_checks=DISABLED_CHECKS)(*args)
    exp.serialize()


def attention_case(dtype, hq, hkv, d, page_size, t, s, code=None, **options):
    """code: a quantized cache's code dtype (the cache argument becomes (codes, scales))."""
    args = batch_args(dtype, hq, hkv, d, page_size, t, s, code=code)
    _export(lambda *a: gpu.ragged_paged_attention(*a, sm_scale=d ** -0.5, **options), *args, donate=(3,))


def grouped_matmul_case(rows, k, n, groups, w_dtype):
    x = jax.ShapeDtypeStruct((rows, k), jnp.bfloat16)
    _export(grouped_matmul.pallas_gpu, x, jax.ShapeDtypeStruct((groups, k, n), w_dtype),
            jax.ShapeDtypeStruct((groups,), jnp.int32))


def cases():
    """(name, check) pairs; each check is bound to its own values (a list of them may be run after the loop)."""
    for dtype, (hq, hkv, d), ps, (t, s) in itertools.product(DTYPES, HEADS, PAGE_SIZES, BATCHES):
        name = f"{jnp.dtype(dtype).name} Hq={hq} Hkv={hkv} D={d} page={ps} T={t} S={s}"
        yield f"attention {name}", partial(attention_case, dtype, hq, hkv, d, ps, t, s)
    yield "attention window+softcap", partial(attention_case, jnp.bfloat16, 16, 8, 128, 16, 128, 64,
                                              sliding_window=100, soft_cap=30.0)
    for d in (80, 96):  # heads Triton takes in power-of-two pieces
        yield f"attention bfloat16 Hq=32 Hkv=8 D={d} page=16 T=128 S=64", partial(
            attention_case, jnp.bfloat16, 32, 8, d, 16, 128, 64)
        yield f"attention decode D={d} splits=8", partial(attention_case, jnp.bfloat16, 32, 8, d, 16, 8, 8,
                                                          num_splits=8)
    for code in (jnp.int8, jnp.float8_e4m3fn):  # quantized caches, prefill-shaped and split-KV decode
        yield f"attention {jnp.dtype(code).name} cache T=128 S=64", partial(
            attention_case, jnp.bfloat16, 32, 8, 128, 16, 128, 64, code=code)
        yield f"attention {jnp.dtype(code).name} cache decode splits=8", partial(
            attention_case, jnp.bfloat16, 32, 8, 128, 16, 8, 8, code=code, num_splits=8)
    for d, splits in ((64, 4), (128, 16), (256, 2)):  # split-KV decode, and each head dim's tile choice
        yield f"attention decode D={d} splits={splits}", partial(attention_case, jnp.bfloat16, 32, 8, d, 16, 8, 8,
                                                                 num_splits=splits)
    # Qwen3-30B-A3B's expert matmuls (128 experts, hidden 2048, 768 columns each): gate/up and down, decode-sized
    # and prefill-sized row counts, bf16 weights and int8 / fp8 codes.
    for rows, k, n, w_dtype in ((8, 2048, 768, jnp.bfloat16), (512, 768, 2048, jnp.bfloat16),
                                (8192, 2048, 768, jnp.bfloat16), (512, 2048, 768, jnp.int8),
                                (64, 768, 2048, jnp.float8_e4m3fn)):
        yield f"grouped matmul R={rows} K={k} N={n} {jnp.dtype(w_dtype).name}", partial(
            grouped_matmul_case, rows, k, n, 128, w_dtype)


def main():
    return run_cases(cases(), "all GPU kernels lowered for cuda")

if __name__ == "__main__":
    sys.exit(main())
