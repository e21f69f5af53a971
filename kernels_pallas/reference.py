"""Pure-jnp ragged paged attention with its KV-cache write: the CPU production path and the test oracle.

Attention design (fast under XLA, no Python loop over sequences or tokens):
- the batch is cut into query tiles of one sequence each (see tiles.py); q is gathered to
  [Hkv, NT, q_tile * G, D] so one batched matmul per kv head serves its whole query-head group;
- a `while_loop` walks kv blocks of `block_kv` positions (a whole number of pages). Its trip count is
  max over tiles of the blocks that tile needs (dynamic: causal end, sliding-window start), each step
  gathers one block of pages per tile ([Hkv, NT, block_kv, D]) and folds it into an online softmax;
- math is float32 whatever the cache dtype.
Decode uses q_tile = 1 (one tile per token, no wasted rows); batches with more tokens than sequences
use q_tile = 16 so a long prefill gathers each kv block once per 16 tokens, and peak memory is
O(NT * block_kv * Hkv * D) whatever the context length.
Masked scores use a large finite negative so fully-masked blocks never produce NaN. Rows past a
sequence's length are read (clamped page ids) and masked, and their V is zeroed: a reused page may hold
anything, even NaN, and masking alone leaves 0 * NaN in p @ v.

A quantized cache is the pair (codes [P, page_size, 2 * Hkv, D] int8 or float8_e4m3fn, scales [P, page_size,
2 * Hkv] float32): each token's K and V of each head is stored as codes times one scale, its largest magnitude over
the code range (`quantize_rows`).
"""
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import tiles as tiles_lib

MASK_VALUE = -1e30


def ragged_paged_attention(q, k, v, kv_pages, slot_mapping, kv_lens, block_tables, cu_q_lens, num_seqs, *,
                           sm_scale, sliding_window=None, soft_cap=None, block_kv=128, q_tile=None):
    # q: [T, Hq, D]; k/v: [T, Hkv, D]; kv_pages: [P, page_size, 2 * Hkv, D] (K of head h at 2h, V at 2h + 1), or
    # (codes, scales) (see the module docstring). Returns (out [T, Hq, D] in q's dtype, kv_pages with this step's
    # K/V written).
    kv_pages = write_kv(kv_pages, k, v, slot_mapping)
    return attend(q, kv_pages, kv_lens, block_tables, cu_q_lens, num_seqs, sm_scale=sm_scale,
                  sliding_window=sliding_window, soft_cap=soft_cap, block_kv=block_kv, q_tile=q_tile), kv_pages


def attend(q, kv_pages, kv_lens, block_tables, cu_q_lens, num_seqs, *, sm_scale, sliding_window=None,
           soft_cap=None, block_kv=128, q_tile=None):
    """Attention over a cache that already holds this step's K/V. q: [T, Hq, D] -> [T, Hq, D]."""
    t, hq, d = q.shape
    codes, scales = kv_pages if isinstance(kv_pages, tuple) else (kv_pages, None)
    num_pages, page_size, two_hkv, _ = codes.shape
    hkv = two_hkv // 2
    s, pages_per_seq = block_tables.shape
    g = hq // hkv
    q_tile = q_tile or tiles_lib.default_q_tile(t, s)
    ppb = max(1, min(block_kv // page_size, pages_per_seq))        # pages per kv block
    bk = ppb * page_size
    plan = tiles_lib.plan(cu_q_lens, num_seqs, kv_lens, num_tokens=t, q_tile=q_tile, kv_block=bk,
                          sliding_window=sliding_window)
    qt = tiles_lib.gather_q(q, plan, q_tile, hkv).astype(jnp.float32) * sm_scale  # [Hkv, NT, M, D]
    row_pos = tiles_lib.row_positions(plan, q_tile, g)             # [NT, M]
    tables = block_tables[plan.seq]                                # [NT, pages_per_seq]
    seq_lens = kv_lens[plan.seq]                                   # [NT]
    nt, m = row_pos.shape

    def body(i, carry):
        m_i, l_i, acc = carry                                      # [Hkv,NT,M], [Hkv,NT,M], [Hkv,NT,M,D]
        blk = plan.first_block + i                                 # [NT]
        cols = jnp.clip(blk[:, None] * ppb + jnp.arange(ppb)[None, :], 0, pages_per_seq - 1)
        pages = jnp.clip(jnp.take_along_axis(tables, cols, axis=1), 0, num_pages - 1)  # [NT, ppb]
        # Row gathers straight into [Hkv, NT, bk, D] (a gather of whole pages then a transpose was ~2x slower on CPU).
        tokens = (pages[:, :, None] * page_size + jnp.arange(page_size)).reshape(nt, bk)      # [NT, bk]
        rows = tokens[None] * hkv + jnp.arange(hkv)[:, None, None]                          # [Hkv, NT, bk]
        # One row per (token, kv head) holds its K then its V. Reshaped inside the loop: a reshape of the
        # just-written cache carried by the loop made XLA:CPU copy the whole cache on every call (65 ms per layer
        # at 68 MB).
        kv = codes.reshape(-1, 2 * d)[rows].astype(jnp.float32)                             # [Hkv, NT, bk, 2D]
        k, v = kv[..., :d], kv[..., d:]
        if scales is not None:
            scale = scales.reshape(-1, 2)[rows]                                             # [Hkv, NT, bk, 2]
            k, v = k * scale[..., :1], v * scale[..., 1:]
        kv_pos = blk[:, None] * bk + jnp.arange(bk)[None, :]       # [NT, bk]
        v = jnp.where((kv_pos < seq_lens[:, None])[None, :, :, None], v, 0.0)  # stale rows: see the docstring
        sc = jnp.einsum("hnmd,hnkd->hnmk", qt, k)                  # [Hkv, NT, M, bk]
        if soft_cap is not None:
            sc = soft_cap * jnp.tanh(sc / soft_cap)
        mask = kv_pos[:, None, :] <= row_pos[:, :, None]           # causal (also bounds kv_len)
        if sliding_window is not None:
            mask &= kv_pos[:, None, :] > row_pos[:, :, None] - sliding_window
        mask &= (i < plan.num_blocks)[:, None, None]
        sc = jnp.where(mask[None], sc, MASK_VALUE)
        m_new = jnp.maximum(m_i, sc.max(-1))
        p = jnp.exp(sc - m_new[..., None])
        alpha = jnp.exp(m_i - m_new)
        acc = acc * alpha[..., None] + jnp.einsum("hnmk,hnkd->hnmd", p, v)
        return m_new, l_i * alpha + p.sum(-1), acc

    init = (jnp.full((hkv, nt, m), MASK_VALUE, jnp.float32), jnp.zeros((hkv, nt, m), jnp.float32),
            jnp.zeros((hkv, nt, m, d), jnp.float32))
    _, l_f, acc = lax.fori_loop(0, jnp.max(plan.num_blocks), body, init)
    o = acc / jnp.maximum(l_f, 1e-30)[..., None]
    return tiles_lib.scatter_out(o, plan, cu_q_lens, num_seqs, q_tile, t).astype(q.dtype)


def interleave(k, v, dtype):
    """k/v: [T, Hkv, D] -> [T, 2 * Hkv, D] in the cache's order (K of head h at 2h, V at 2h + 1)."""
    t, hkv, d = k.shape
    return jnp.stack([k, v], axis=2).reshape(t, 2 * hkv, d).astype(dtype)


CODE_MAX = {np.dtype(jnp.int8): 127.0, np.dtype(jnp.float8_e4m3fn): 448.0}  # the quantized caches' codes


def quantize_rows(x, dtype):
    """x [..., D] -> (codes [..., D] of dtype, scales [...] float32): each row over its largest magnitude times the
    code range, rounded to the nearest code (int8) or converted (fp8, round to nearest even)."""
    x = x.astype(jnp.float32)
    top = CODE_MAX[np.dtype(dtype)]
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(amax > 0, amax / top, 1.0)
    scaled = x / scale[..., None]
    if np.dtype(dtype) == np.int8:
        scaled = jnp.clip(jnp.round(scaled), -top, top)
    return scaled.astype(dtype), scale


def write_kv(kv_pages, k, v, slot_mapping):
    """kv_pages: [P, page_size, 2 * Hkv, D], or a quantized cache (codes, scales); k/v: [T, Hkv, D] go to
    slot_mapping [T] (page * page_size + offset; negative = padding, skipped). Returns the updated cache (XLA
    updates it in place when it is donated)."""
    codes, scales = kv_pages if isinstance(kv_pages, tuple) else (kv_pages, None)
    if scales is None:
        return write_slots(codes, interleave(k, v, codes.dtype), slot_mapping)
    rows, row_scales = quantize_rows(interleave(k, v, jnp.float32), codes.dtype)
    return write_slots(codes, rows, slot_mapping), write_slots(scales, row_scales, slot_mapping)


def write_slots(pages, rows, slot_mapping):
    """pages [P, page_size, ...] with rows [T, ...] written at slot_mapping [T] (negative: padding, dropped)."""
    num_pages, page_size = pages.shape[:2]
    # Negative indices would wrap around in jnp; send padding to an out-of-range page and drop it. The [P, page_size]
    # dims are indexed directly: a scatter into a reshape of the cache is not done in place by XLA:CPU (see attend).
    page = jnp.where(slot_mapping < 0, num_pages, slot_mapping // page_size)
    return pages.at[page, slot_mapping % page_size].set(rows, mode="drop")
