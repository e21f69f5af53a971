"""Pallas GPU (Triton backend) ragged paged attention; the KV-cache write is XLA's scatter (reference.write_kv).

Attention
- Work items are the query tiles of tiles.py; rows of a tile are (token, query head of one kv-head
  group), padded to a power of two >= 16 because Triton tensors must have power-of-two sizes and
  tl.dot needs M >= 16.
- grid = (Hkv, NT, splits): one program per kv head, tile and split of the tile's kv range. Decode of
  a few sequences has few programs (Hkv x NT: 64 for 8 sequences of an 8-kv-head model, on 132 SMs), so
  decode-shaped batches split each tile's kv blocks into `num_kv_splits` parts (flash-decoding): each
  program writes its part's unnormalized output, max and sum, merged by a log-sum-exp in XLA after.
  One split (prefill, large batches) normalizes in the kernel. Tiles per head dim: `TILES`. A head that
  is not a power of two (80, 96) is loaded and multiplied in power-of-two pieces (`head_parts`).
  The q tile [rows, D] and row positions [rows]
  come through BlockSpecs; the tile plan, per-sequence kv lengths and the flattened block tables
  are whole-array refs read with scalar / vector loads.
- K/V: the program's kv head's K and V slices of the cache ([P, page_size, D] each, strided views of the
  combined [P, page_size, 2 * Hkv, D] pages) are refs; each loop step gathers one kv block
  of `block_kv // page_size` pages (a power of two) with a vector-indexed load -> [block_kv, D],
  then runs two tl.dot's (f32 accumulation) and an online softmax in float32. Triton software-
  pipelines the loop (num_stages), overlapping the next block's loads with this block's math.
  Each tile visits only the kv blocks of its causal / sliding-window range; page ids past a
  sequence's last page are clamped to it and V rows past its length are zeroed (stale values, even
  NaN, cannot reach p @ v).
KV write: XLA's scatter into the donated cache, in place (a Triton kernel per row bought nothing over it).
A quantized cache (codes, scales: reference.py) is read as codes cast to q's dtype, each key's scale applied to its
column of the scores and each value's to its column of p before p @ v, so no dequantized tile is formed.
Tolerances vs the reference in tests (atol = rtol): 2e-5 f32, 3e-2 bf16.
Lowering uses pallas.triton.CompilerParams; exporting needs the Triton custom call allowed
(check_gpu.DISABLED_CHECKS). `interpret=True` runs the kernel in the generic Pallas interpreter.
"""
import functools
import operator

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import reference
from . import tiles as tiles_lib

MASK_VALUE = -1e30


def head_parts(d: int) -> tuple[tuple[int, int], ...]:
    """(offset, width) pieces of a head: the powers of two that sum to d, largest first (80 -> (0, 64), (64, 16)).
    Triton tensors must have power-of-two sizes and tl.dot a K of at least 16, so a head of 80 or 96 is loaded and
    multiplied in pieces; d must be a multiple of 16."""
    if d % 16:
        raise ValueError(f"the Pallas GPU attention needs a head_dim that is a multiple of 16, not {d}")
    widths = [1 << b for b in reversed(range(d.bit_length())) if d >> b & 1]
    return tuple((sum(widths[:i]), w) for i, w in enumerate(widths))


def _attention_kernel(seq_ref, first_ref, nblk_ref, kv_lens_ref, tables_ref, q_ref, pos_ref,
                      k_ref, v_ref, *refs, pages_per_block, pages_per_seq, sm_scale,
                      sliding_window, soft_cap, num_splits, quantized):
    # seq/first/nblk_ref: [NT]; kv_lens_ref: [S]; tables_ref: [S * pages_per_seq];
    # q_ref: [rows, D]; pos_ref: [rows]; k_ref/v_ref: [P, page_size, D] of this kv head; quantized: refs starts
    # with ks_ref/vs_ref [P, page_size], the scales of this kv head's K and V.
    # out_refs: o [rows, D] normalized (one split), or acc [rows, D] f32, m [rows], l [rows] of this split's
    # kv blocks (several splits; combined outside). Every [.., D] value is held as head_parts(D) pieces.
    ks_ref, vs_ref = refs[:2] if quantized else (None, None)
    out_refs = refs[2:] if quantized else refs
    i, split = pl.program_id(1), pl.program_id(2)
    seq, first, nblk = seq_ref[i], first_ref[i], nblk_ref[i]
    kv_len = kv_lens_ref[seq]
    _, page_size, d = k_ref.shape
    parts = [pl.ds(o, w) for o, w in head_parts(d)]
    last_page = jnp.maximum(kv_len - 1, 0) // page_size
    block_kv = pages_per_block * page_size
    dot_dtype = q_ref.dtype if quantized else k_ref.dtype  # int8 / fp8 codes are exact in bf16
    qs = [(q_ref[:, c].astype(jnp.float32) * sm_scale).astype(dot_dtype) for c in parts]  # [rows, w] each
    pos = pos_ref[...][:, None]                                            # [rows, 1]
    rows = qs[0].shape[0]

    def body(b, carry):
        m_i, l_i, accs = carry                         # [rows], [rows], [rows, w] f32 per part
        blk = first + b
        cols = jnp.minimum(blk * pages_per_block + jnp.arange(pages_per_block), last_page)
        pages = tables_ref[seq * pages_per_seq + cols]                     # [pages_per_block]
        # Rows past the sequence's end may hold anything (a reused page, even NaN): 0 * NaN in p @ v.
        live = (blk * block_kv + jnp.arange(block_kv))[:, None] < kv_len
        s = functools.reduce(operator.add, (
            plgpu.dot(q, k_ref[pages, :, c].reshape(block_kv, c.size).astype(dot_dtype), trans_b=True)
            for q, c in zip(qs, parts)))  # [rows, block_kv] f32
        if quantized:
            s = s * ks_ref[pages, :].reshape(1, block_kv)
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        kv_pos = blk * block_kv + jnp.arange(block_kv)[None, :]
        mask = kv_pos <= pos
        if sliding_window is not None:
            mask &= kv_pos > pos - sliding_window
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m_i, s.max(axis=1))
        p = jnp.exp(s - m_new[:, None])
        alpha = jnp.exp(m_i - m_new)
        pv = (p * vs_ref[pages, :].reshape(1, block_kv) if quantized else p).astype(dot_dtype)
        accs = tuple(acc * alpha[:, None] + plgpu.dot(pv, jnp.where(live, v, jnp.zeros_like(v)))
                     for acc, v in zip(accs, (v_ref[pages, :, c].reshape(block_kv, c.size).astype(dot_dtype)
                                              for c in parts)))
        return m_new, l_i * alpha + p.sum(axis=1), accs

    init = (jnp.full((rows,), MASK_VALUE, jnp.float32), jnp.zeros((rows,), jnp.float32),
            tuple(jnp.zeros((rows, c.size), jnp.float32) for c in parts))
    if num_splits == 1:
        _, l_f, accs = lax.fori_loop(0, nblk, body, init)
        for acc, c in zip(accs, parts):
            out_refs[0][:, c] = (acc / jnp.maximum(l_f, 1e-30)[:, None]).astype(out_refs[0].dtype)
        return
    per = lax.div(nblk + num_splits - 1, num_splits)                   # this tile's blocks per split
    start = jnp.minimum(split * per, nblk)
    m_f, l_f, accs = lax.fori_loop(start, jnp.minimum(start + per, nblk), body, init)
    acc_ref, m_ref, l_ref = out_refs
    for acc, c in zip(accs, parts):
        acc_ref[:, c] = acc
    m_ref[...] = m_f
    l_ref[...] = l_f


def _pow2_at_least(n, lo):
    return max(lo, 1 << (n - 1).bit_length())


# (block_kv, num_warps) per head dim. K and V tiles of block_kv x D, double-buffered (num_stages=2), take
# 4 * block_kv * D * 2 bytes of shared memory in bf16: 64 KiB at D=128, well inside an H100/H200's 228 KiB, so two
# programs can share an SM; D=256 halves block_kv to keep that budget and doubles the warps that hold the
# [rows, 256] float32 accumulator in registers. Chosen from these budgets, not tuned on a GPU (none was lent).
TILES = {64: (64, 4), 128: (64, 4), 256: (32, 8)}
SM_COUNT = 132  # H100 SXM / H200: the GPUs bench/device_check.py targets
MAX_SPLITS = 16


def num_kv_splits(programs: int, max_blocks: int, sm_count: int = SM_COUNT) -> int:
    """Splits of each tile's kv range for `programs` (kv heads x query tiles) programs: enough to give every SM
    work when programs alone would leave most idle (decode of a few long sequences), never more than a tile
    has kv blocks. A power of two, so every split count compiles to the same few programs."""
    want = min(max_blocks, MAX_SPLITS, max(1, sm_count // max(programs, 1)))
    return 1 << (want.bit_length() - 1)


def _combine(acc, m, l):
    """acc [..., splits, rows, D] f32, m/l [..., splits, rows] -> the softmax-weighted merge [..., rows, D]."""
    top = m.max(axis=-2, keepdims=True)
    w = jnp.exp(m - top)                                                   # empty splits (m = MASK_VALUE): 0
    return (w[..., None] * acc).sum(-3) / jnp.maximum((w * l).sum(-2), 1e-30)[..., None]


def ragged_paged_attention(q, k, v, kv_pages, slot_mapping, kv_lens, block_tables, cu_q_lens, num_seqs, *,
                           sm_scale, sliding_window=None, soft_cap=None, block_kv=None, q_tile=None,
                           num_warps=None, num_stages=2, num_splits=None, interpret=False):
    # q: [T, Hq, D]; k/v: [T, Hkv, D]; kv_pages: [P, page_size, 2 * Hkv, D]; returns (out [T, Hq, D], kv_pages).
    # block_kv / num_warps: default from TILES; num_splits: default num_kv_splits for decode-shaped batches
    # (q_tile 1), 1 otherwise.
    kv_pages = reference.write_kv(kv_pages, k, v, slot_mapping)
    quantized = isinstance(kv_pages, tuple)
    codes, scales = kv_pages if quantized else (kv_pages, None)
    t, hq, d = q.shape
    num_pages, page_size, two_hkv, _ = codes.shape
    hkv = two_hkv // 2
    s, pages_per_seq = block_tables.shape
    g = hq // hkv
    tile_kv, tile_warps = TILES.get(d, TILES[128])
    block_kv, num_warps = block_kv or tile_kv, num_warps or tile_warps
    q_tile = q_tile or tiles_lib.default_q_tile(t, s)
    ppb = _pow2_at_least(max(1, block_kv // page_size), 1)             # pages per kv block
    plan = tiles_lib.plan(cu_q_lens, num_seqs, kv_lens, num_tokens=t, q_tile=q_tile,
                          kv_block=ppb * page_size, sliding_window=sliding_window)
    m = q_tile * g
    rows = _pow2_at_least(m, 16)
    qt = jnp.pad(tiles_lib.gather_q(q, plan, q_tile, hkv), ((0, 0), (0, 0), (0, rows - m), (0, 0)))
    pos = jnp.pad(tiles_lib.row_positions(plan, q_tile, g), ((0, 0), (0, rows - m)),
                  constant_values=-1)                                     # [NT, rows]
    nt = pos.shape[0]
    if num_splits is None:
        num_splits = num_kv_splits(hkv * nt, -(-pages_per_seq // ppb)) if q_tile == 1 else 1
    kernel = functools.partial(_attention_kernel, pages_per_block=ppb, pages_per_seq=pages_per_seq,
                               sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                               num_splits=num_splits, quantized=quantized)
    whole = lambda n: pl.BlockSpec((n,), lambda h, i, j: (0,))
    q_block = pl.BlockSpec((None, None, rows, d), lambda h, i, j: (h, i, 0, 0))
    k_block = pl.BlockSpec((num_pages, page_size, None, d), lambda h, i, j: (0, 0, 2 * h, 0))
    v_block = pl.BlockSpec((num_pages, page_size, None, d), lambda h, i, j: (0, 0, 2 * h + 1, 0))
    scale_blocks = [pl.BlockSpec((num_pages, page_size, None), lambda h, i, j, kv=kv: (0, 0, 2 * h + kv))
                    for kv in (0, 1)] if quantized else []
    if num_splits == 1:
        out_shape = jax.ShapeDtypeStruct((hkv, nt, rows, d), q.dtype)
        out_specs = q_block
    else:
        out_shape = (jax.ShapeDtypeStruct((hkv, nt, num_splits, rows, d), jnp.float32),
                     jax.ShapeDtypeStruct((hkv, nt, num_splits, rows), jnp.float32),
                     jax.ShapeDtypeStruct((hkv, nt, num_splits, rows), jnp.float32))
        out_specs = (pl.BlockSpec((None, None, None, rows, d), lambda h, i, j: (h, i, j, 0, 0)),
                     pl.BlockSpec((None, None, None, rows), lambda h, i, j: (h, i, j, 0)),
                     pl.BlockSpec((None, None, None, rows), lambda h, i, j: (h, i, j, 0)))
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(hkv, nt, num_splits),
        in_specs=[whole(nt), whole(nt), whole(nt), whole(s), whole(s * pages_per_seq), q_block,
                  pl.BlockSpec((None, rows), lambda h, i, j: (i, 0)), k_block, v_block, *scale_blocks],
        out_specs=out_specs,
        cost_estimate=tiles_lib.attention_cost(q, codes, s, pages_per_seq),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )(plan.seq, plan.first_block, plan.num_blocks, kv_lens.astype(jnp.int32), block_tables.reshape(-1), qt, pos,
      codes, codes, *((scales, scales) if quantized else ()))
    if num_splits > 1:
        out = _combine(*out).astype(q.dtype)
    return tiles_lib.scatter_out(out[:, :, :m], plan, cu_q_lens, num_seqs, q_tile, t), kv_pages
