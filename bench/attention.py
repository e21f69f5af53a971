"""CPU micro-benchmark: the reference ragged paged attention vs the C++ kernel the engine runs on CPU over a float32
cache (kernels_cpu/paged_attention.cc) vs a naive dense attention, over a cache that already
holds the step's K/V; then the engine's whole call (write the step's K/V into a donated cache of one layer's share
of the CPU default 2 GiB, then attend), which shows whether XLA updates the cache in place (a copy costs ~65 ms).

Naive dense = gather every sequence's whole page table into a contiguous [S, Hkv, L, D] cache, give
each query token its sequence's copy and run a masked softmax over all L positions.
Shapes: SmolLM2-135M attention (Hq=9, Hkv=3, D=64), page_size 16, float32 (the CPU dtype).
Run: python bench/attention.py [--repeat N]. Prints tokens/s; it is not a test.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import kernels_cpu
import kernels_pallas
from jaxserve.weights.default_model import cache_dir
from kernels_pallas import reference

HQ, HKV, D, PAGE = 9, 3, 64, 16


def naive_dense(q, kv_pages, kv_lens, block_tables, cu_q_lens, num_seqs, *, sm_scale):
    t, hq, d = q.shape
    hkv = kv_pages.shape[2] // 2
    s = block_tables.shape[0]
    rows = kv_pages[block_tables].reshape(s, -1, hkv, 2, d)             # [S, L, Hkv, 2, D]
    k = rows[..., 0, :].transpose(2, 0, 1, 3)                           # [Hkv, S, L, D]
    v = rows[..., 1, :].transpose(2, 0, 1, 3)
    tok = jnp.arange(t)
    seq = jnp.minimum(jnp.searchsorted(cu_q_lens[1:], tok, side="right"), s - 1)
    pos = kv_lens[seq] - (cu_q_lens[seq + 1] - cu_q_lens[seq]) + tok - cu_q_lens[seq]
    qg = q.reshape(t, hkv, hq // hkv, d)
    sc = jnp.einsum("thgd,htld->thgl", qg, k[:, seq]) * sm_scale
    mask = jnp.arange(k.shape[2])[None, :] <= pos[:, None]              # [T, L]
    sc = jnp.where(mask[:, None, None], sc, -1e30)
    o = jnp.einsum("thgl,htld->thgd", jax.nn.softmax(sc, axis=-1), v[:, seq])
    valid = tok < cu_q_lens[num_seqs[0]]
    return jnp.where(valid[:, None, None], o.reshape(t, hq, d), 0).astype(q.dtype)


def batch(rng, q_lens, ctx, pages_per_seq):
    s = len(q_lens)
    num_pages = s * pages_per_seq
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    return (f(int(cu[-1]), HQ, D), f(num_pages, PAGE, 2 * HKV, D), jnp.full((s,), ctx, jnp.int32),
            jnp.asarray(rng.permutation(num_pages).reshape(s, pages_per_seq), jnp.int32), jnp.asarray(cu),
            jnp.asarray([s], jnp.int32))


def tokens_per_s(fn, args, tokens, repeat, rounds=3):
    """Best of `rounds` timings of `repeat` calls: the 2 cores are shared, so take the least disturbed."""
    jax.block_until_ready(fn(*args))                                    # compile + warm up
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(repeat):
            jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return tokens * repeat / best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=20)
    repeat = ap.parse_args().repeat
    rng = np.random.default_rng(0)
    ref = jax.jit(lambda *a: reference.attend(*a, sm_scale=D ** -0.5))
    dense = jax.jit(lambda *a: naive_dense(*a, sm_scale=D ** -0.5))
    kernel = None
    if kernels_cpu.enable(cache_dir() / "kernels-cpu"):
        kernel = jax.jit(lambda *a: kernels_cpu.paged_attention(*a, sm_scale=D ** -0.5))
    cases = [(f"decode batch {b:2d}, ctx {ctx}", [1] * b, ctx) for b, ctx in ((1, 512), (8, 512), (16, 256),
                                                                               (16, 1024), (32, 512))]
    cases.append(("prefill 512 tokens", [512], 512))
    print(f"{'case':28s} {'reference tok/s':>16s} {'C++ kernel tok/s':>17s} {'naive dense tok/s':>18s}")
    for name, q_lens, ctx in cases:
        args = batch(rng, q_lens, ctx, pages_per_seq=ctx // PAGE)
        tokens = sum(q_lens)
        r = tokens_per_s(ref, args, tokens, repeat)
        k = f"{tokens_per_s(kernel, args, tokens, repeat):17.0f}" if kernel else f"{'(not built)':>17s}"
        n = tokens_per_s(dense, args, tokens, max(1, repeat // 4))
        print(f"{name:28s} {r:16.0f} {k} {n:18.0f}")
    print(f"{'write + attend, donated cache':36s} {'ms per call':>12s}")
    for b in (1, 8):
        print(f"{f'decode batch {b}, ctx 512':36s} {write_and_attend_ms(rng, b, 512, repeat):12.3f}")


def write_and_attend_ms(rng, seqs, ctx, repeat, cache_bytes=(2 << 30) // 30):
    """One layer's engine call on decode rows, the cache threaded through the calls as the engine donates it."""
    num_pages = cache_bytes // (PAGE * 2 * HKV * D * 4)
    tables = rng.permutation(num_pages)[:seqs * (ctx // PAGE)].reshape(seqs, -1)
    pos = ctx - 1
    slots = jnp.asarray(tables[:, pos // PAGE] * PAGE + pos % PAGE, jnp.int32)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    q, k = f(seqs, HQ, D), f(seqs, HKV, D)
    rest = (slots, jnp.full((seqs,), ctx, jnp.int32), jnp.asarray(tables, jnp.int32),
            jnp.arange(seqs + 1, dtype=jnp.int32), jnp.asarray([seqs], jnp.int32))
    call = jax.jit(lambda c: kernels_pallas.ragged_paged_attention(q, k, k, c, *rest, sm_scale=D ** -0.5),
                   donate_argnums=0)
    out, cache = call(jnp.zeros((num_pages, PAGE, 2 * HKV, D), jnp.float32))
    best = float("inf")
    for _ in range(3):
        jax.block_until_ready(out)
        t0 = time.perf_counter()
        for _ in range(repeat):
            out, cache = call(cache)
        jax.block_until_ready(out)
        best = min(best, time.perf_counter() - t0)
    return best / repeat * 1e3


if __name__ == "__main__":
    main()
