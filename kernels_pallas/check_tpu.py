"""Compile every TPU kernel for v5e and v6e without a TPU: `python -m kernels_pallas.check_tpu`.

Needs the libtpu wheel pinned by jax[tpu] on PYTHONPATH (tests/kernels/test_compile_tpu.py installs
it). Each case is traced with ShapeDtypeStructs placed on one device of a 2x2 topology (block sizes of that
chip's generation), lowered and compiled by Mosaic/XLA:TPU, which catches layout and tiling errors that lowering alone misses.
Prints one line per case and exits non-zero if any case fails. `--quick` runs one case per kernel.
"""
import itertools
import sys
from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from . import tpu
from .check_runner import run_cases

TOPOLOGIES = ("v5e:2x2", "v6e:2x2")
DTYPES = (jnp.float32, jnp.bfloat16)
HEADS = ((9, 3, 64), (32, 8, 128), (14, 2, 64), (16, 8, 128))   # (Hq, Hkv, D) of the engine's models
PAGE_SIZES = (16, 32, 128)
BATCHES = ((16, 16), (128, 64), (512, 8))                         # (T tokens, S sequences)
PAGES_PER_SEQ = 64


def batch_args(dtype, hq, hkv, d, page_size, t, s, place=lambda x: x, code=None):
    """Abstract arguments of one attention call: a cache of PAGES_PER_SEQ pages per sequence; code: a quantized
    cache's code dtype (the cache argument is then (codes, scales))."""
    sd = lambda shape, dt: place(jax.ShapeDtypeStruct(shape, dt))
    pages = (s * PAGES_PER_SEQ, page_size, 2 * hkv, d)
    cache = sd(pages, dtype) if code is None else (sd(pages, code), sd(pages[:3], jnp.float32))
    return (sd((t, hq, d), dtype), sd((t, hkv, d), dtype), sd((t, hkv, d), dtype), cache, sd((t,), jnp.int32),
            sd((s,), jnp.int32), sd((s, PAGES_PER_SEQ), jnp.int32), sd((s + 1,), jnp.int32), sd((1,), jnp.int32))


def attention_case(device, dtype, hq, hkv, d, page_size, t, s, code=None, **options):
    place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(device))
    fn = lambda *a: tpu.ragged_paged_attention(*a, sm_scale=d ** -0.5, **options)
    args = batch_args(dtype, hq, hkv, d, page_size, t, s, place, code)
    jax.jit(fn, donate_argnums=3).trace(*args).lower().compile()


def cases(quick):
    for topo in TOPOLOGIES:
        device = topologies.get_topology_desc(topo, platform="tpu").devices[0]
        chip = tpu.generation(device.device_kind)
        grid = itertools.product(DTYPES, HEADS, PAGE_SIZES, BATCHES)
        if quick:
            grid = [(jnp.bfloat16, HEADS[0], 16, BATCHES[1])]
        for dtype, (hq, hkv, d), ps, (t, s) in grid:
            name = f"{topo} {jnp.dtype(dtype).name} Hq={hq} Hkv={hkv} D={d} page={ps} T={t} S={s}"
            yield f"attention {name}", partial(attention_case, device, dtype, hq, hkv, d, ps, t, s, generation=chip)
        # Sliding window and soft cap change the kernel body: compile them once per topology.
        yield f"attention {topo} window+softcap", partial(
            attention_case, device, jnp.bfloat16, 16, 8, 128, 16, 128, 64, generation=chip, sliding_window=100,
            soft_cap=30.0)
        for d in (80, 96):  # head sizes that are not a power of two (Phi-3's 96)
            yield f"attention {topo} bfloat16 Hq=32 Hkv=8 D={d} page=128 T=128 S=64", partial(
                attention_case, device, jnp.bfloat16, 32, 8, d, 128, 128, 64, generation=chip)
        for dtype in DTYPES:  # one kv head per chip (Llama-3.1-8B at tp 8): the heads axis padded most
            yield f"attention {topo} {jnp.dtype(dtype).name} Hq=4 Hkv=1 D=128 page=16 T=64 S=64", partial(
                attention_case, device, dtype, 4, 1, 128, 16, 64, 64, generation=chip)
        # Quantized caches (--kv-cache-dtype), prefill- and decode-shaped: 8, 3 and 1 kv heads, i.e. 16, 6 and 2
        # rows per token, which Mosaic's DMAs into a padded 8-bit block refused below 8 (see tpu.py).
        for code, (hq, hkv, d), (ps, t, s) in itertools.product((jnp.int8, jnp.float8_e4m3fn),
                                                                ((32, 8, 128), (9, 3, 64), (4, 1, 128)),
                                                                ((16, 128, 64), (128, 64, 64))):
            yield (f"attention {topo} {jnp.dtype(code).name} cache Hq={hq} Hkv={hkv} D={d} page={ps} T={t} S={s}",
                   partial(attention_case, device, jnp.bfloat16, hq, hkv, d, ps, t, s, code=code, generation=chip))


def main(argv):
    return run_cases(cases("--quick" in argv), "all TPU kernels compiled")

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
