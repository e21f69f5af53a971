"""Query tiles: the shared plan that turns a ragged batch into fixed-size work items.

A tile holds up to `q_tile` consecutive query tokens of ONE sequence, so every tile reads a single
sequence's pages. Tile rows are laid out per kv head as (token, group head): row = r * G + g with
G = Hq // Hkv, so one matmul per kv head serves all its query heads and GQA never repeats K/V.

The number of tiles is static: sum_s ceil(q_len_s / q_tile) <= min(T, (T + S * (q_tile - 1)) // q_tile).
Each tile also gets the range of kv blocks it must visit (causal end, sliding-window start), so
kernels skip blocks that are fully masked.
"""
from typing import NamedTuple

import jax.numpy as jnp
from jax.experimental import pallas as pl


class Tiles(NamedTuple):
    seq: jnp.ndarray          # [NT] int32 sequence of the tile (clamped to S-1 for empty tiles)
    start: jnp.ndarray        # [NT] int32 token index of the tile's first row
    length: jnp.ndarray       # [NT] int32 valid tokens in the tile (0 = padding tile)
    pos0: jnp.ndarray         # [NT] int32 absolute kv position of the tile's first token
    first_block: jnp.ndarray  # [NT] int32 first kv block to visit
    num_blocks: jnp.ndarray   # [NT] int32 kv blocks to visit (0 for padding tiles)


def num_tiles(num_tokens, max_seqs, q_tile):
    """Static upper bound on the tiles a batch of `num_tokens` over `max_seqs` sequences needs."""
    return max(1, min(num_tokens, (num_tokens + max_seqs * (q_tile - 1)) // q_tile))


def default_q_tile(num_tokens, max_seqs, prefill=16):
    """1 for decode-shaped batches (no wasted rows), `prefill` when tokens outnumber sequences."""
    return 1 if num_tokens <= max_seqs else prefill


def _q_lens(cu_q_lens, num_seqs):
    # [S] query length per sequence; sequences >= num_seqs count as empty whatever cu_q_lens says.
    s = cu_q_lens.shape[0] - 1
    lens = cu_q_lens[1:] - cu_q_lens[:-1]
    return jnp.where(jnp.arange(s) < num_seqs[0], lens, 0)


def plan(cu_q_lens, num_seqs, kv_lens, *, num_tokens, q_tile, kv_block, sliding_window):
    """Tiles for this batch; kv blocks are `kv_block` positions long."""
    s = kv_lens.shape[0]
    nt = num_tiles(num_tokens, s, q_tile)
    q_lens = _q_lens(cu_q_lens, num_seqs)
    per_seq = (q_lens + q_tile - 1) // q_tile                      # [S]
    tile_end = jnp.cumsum(per_seq)                                 # [S] exclusive end tile per seq
    t = jnp.arange(nt, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(tile_end, t, side="right"), s - 1).astype(jnp.int32)
    local = t - (tile_end[seq] - per_seq[seq])                     # tile index within its sequence
    length = jnp.where(t < tile_end[-1], jnp.clip(q_lens[seq] - local * q_tile, 0, q_tile), 0)
    pos0 = kv_lens[seq] - q_lens[seq] + local * q_tile
    lo = jnp.maximum(pos0 - sliding_window + 1, 0) if sliding_window else jnp.zeros_like(pos0)
    first = lo // kv_block
    last = (pos0 + length - 1) // kv_block
    nblk = jnp.where(length > 0, last - first + 1, 0)
    start = cu_q_lens[seq] + local * q_tile
    return Tiles(seq, start.astype(jnp.int32), length.astype(jnp.int32), pos0.astype(jnp.int32),
                 first.astype(jnp.int32), nblk.astype(jnp.int32))


def row_positions(tiles, q_tile, group):
    """[NT, q_tile * group] int32 absolute position of each tile row; -1 marks padding rows."""
    r = jnp.arange(q_tile * group, dtype=jnp.int32) // group
    pos = tiles.pos0[:, None] + r[None, :]
    return jnp.where(r[None, :] < tiles.length[:, None], pos, -1)


def gather_q(q, tiles, q_tile, num_kv_heads):
    """q: [T, Hq, D] -> [Hkv, NT, q_tile * G, D]; padding rows repeat a valid token (masked later)."""
    t, hq, d = q.shape
    g = hq // num_kv_heads
    idx = jnp.clip(tiles.start[:, None] + jnp.arange(q_tile)[None, :], 0, t - 1)   # [NT, q_tile]
    x = q[idx].reshape(-1, q_tile, num_kv_heads, g, d)                              # [NT, Qt, Hkv, G, D]
    return x.transpose(2, 0, 1, 3, 4).reshape(num_kv_heads, -1, q_tile * g, d)


def scatter_out(o, tiles, cu_q_lens, num_seqs, q_tile, num_tokens):
    """o: [Hkv, NT, q_tile * G, D] -> [T, Hq, D]; padding tokens are zeros. Uses a gather (no scatter)."""
    hkv, _, m, d = o.shape
    g = m // q_tile
    q_lens = _q_lens(cu_q_lens, num_seqs)
    per_seq = (q_lens + q_tile - 1) // q_tile
    tile_begin = jnp.cumsum(per_seq) - per_seq                     # [S] first tile of each seq
    tok = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(cu_q_lens[1:], tok, side="right"), q_lens.shape[0] - 1)
    local = tok - cu_q_lens[seq]
    valid = tok < cu_q_lens[num_seqs[0]]
    tile = jnp.clip(tile_begin[seq] + local // q_tile, 0, o.shape[1] - 1)
    row = local % q_tile
    x = o.reshape(hkv, -1, q_tile, g, d)[:, tile, row]             # [Hkv, T, G, D]
    x = x.transpose(1, 0, 2, 3).reshape(num_tokens, hkv * g, d)
    return jnp.where(valid[:, None, None], x, 0).astype(o.dtype)


def attention_cost(q, kv_pages, max_seqs, pages_per_seq):
    """What an attention call costs with every block table full (each sequence at its longest), bounded by
    the cache: the compiler's cost analysis (and `jaxserve check`'s roofline) sees this instead of nothing.
    q: [T, Hq, D]; kv_pages: [P, page_size, 2 * Hkv, D]."""
    t, hq, d = q.shape
    num_pages, page_size, two_hkv, _ = kv_pages.shape
    kv_rows = min(max_seqs * pages_per_seq, num_pages) * page_size       # positions read, per kv head
    queries = -(-t // max_seqs)                                          # per sequence
    return pl.CostEstimate(flops=4 * hq * d * kv_rows * queries, transcendentals=hq * kv_rows * queries,
                           bytes_accessed=two_hkv * kv_rows * d * kv_pages.dtype.itemsize + 2 * q.size * q.dtype.itemsize)
