"""Pure-jnp ragged paged attention and KV-cache write: the CPU production path and the test oracle.

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
"""
import jax.numpy as jnp
from jax import lax

from . import tiles as tiles_lib

MASK_VALUE = -1e30


def ragged_paged_attention(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs, *,
                           sm_scale, sliding_window=None, soft_cap=None, block_kv=128, q_tile=None):
    # q: [T, Hq, D]; k_pages/v_pages: [Hkv, P, page_size, D]; returns [T, Hq, D] in q's dtype.
    t, hq, d = q.shape
    hkv, num_pages, page_size, _ = k_pages.shape
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
        k = k_pages[:, pages].reshape(hkv, nt, bk, d).astype(jnp.float32)
        v = v_pages[:, pages].reshape(hkv, nt, bk, d).astype(jnp.float32)
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


def write_kv(k_pages, v_pages, k_new, v_new, slot_mapping):
    # k_pages/v_pages: [Hkv, P, page_size, D]; k_new/v_new: [T, Hkv, D]; slot_mapping: [T] int32.
    hkv, num_pages, page_size, d = k_pages.shape
    n = num_pages * page_size
    # Negative indices would wrap around in jnp; send padding to an out-of-range slot and drop it.
    slots = jnp.where(slot_mapping < 0, n, slot_mapping)

    def put(pages, new):
        flat = pages.reshape(hkv, n, d)
        flat = flat.at[:, slots].set(new.transpose(1, 0, 2).astype(pages.dtype), mode="drop")
        return flat.reshape(pages.shape)

    return put(k_pages, k_new), put(v_pages, v_new)
