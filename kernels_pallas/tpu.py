"""Pallas TPU (Mosaic) ragged paged attention with the KV-cache write fused in.

Cache layout: kv_pages [P, page_size, 2 * Hkv, D], K of kv head h at 2h and V at 2h + 1. The last two dims hold
one token's K and V of every head, so
- a page (all heads, K and V) is one contiguous DMA, HBM -> VMEM, whatever the head count;
- one token is one DMA at a leading-dim offset: Mosaic refuses DMAs at offsets that are not tile-aligned in the
  last two dims, which rules out writing a single bf16 token into a [.., page_size, D] layout (checked by
  compiling for v6e with libtpu) and forced the separate write kernel this one replaces;
- a head's K and V are sublane-strided loads of the block flattened to rows (`_head_kv`); in bf16 a token's K and
  V of one head share a 32-bit word, loaded once and split. The VMEM block pads the heads axis to the sublane
  tile, so flattening it is a view at any head count. (Indexing `buf[:, 2h, :]` instead compiled to a relayout of
  the whole block per head: about 13x the vector instructions in the compiled kernel.)

Grid = (NT,) query tiles of tiles.py (up to q_tile tokens of one sequence), "arbitrary": one core walks the
tiles in order, so work of tile i+1 can be started during tile i:
- tile i+1's block-table row (HBM -> SMEM; SMEM holds two rows, never the [S, P] table, which at long contexts
  exceeds SMEM) and its tokens' K/V rows (HBM -> HBM, one DMA each, into their slots) start at tile i's
  beginning; during tile i's last kv block they are awaited and tile i+1's first kv block starts, so the next
  sequence's first DMA overlaps this one's last matmuls;
- within a tile, block b+1 is in flight while block b is computed (two VMEM slots; a running block count
  picks the slot across tiles).
A tile reads only after its own tokens (and every earlier tile's) are written. A block may be read while the
next tile's tokens land in it: those rows lie past this tile's last position, so they are masked, and V rows
past it are zeroed (masking alone leaves 0 * NaN in p @ v when a reused page holds NaN), as are rows past the
sequence's end.
Every query head of the tile is computed in the grid step (q block [Hkv, rows, D], rows = q_tile x group
heads padded to 16); online softmax in float32 with MXU matmuls in the cache dtype. Decode-shaped batches
(no more tokens than sequences) use q_tile 1: one grid step per sequence, its one token written by one DMA.
A quantized cache (codes, scales: reference.py) is read as codes and dequantized per head in VMEM: this step's
rows are quantized as the reference does and their codes written by the same per-token DMAs; their scales
([P, page_size, 2 * Hkv] float32, a token's row at an offset in the tiled second-to-last dim, which a DMA refuses)
are written by XLA's scatter before the kernel; each kv block's scales come with its pages, one DMA per page.
The codes' VMEM block is not padded to the 8-bit sublane tile (32): Mosaic refuses a DMA into a slice of a tiled
8-bit axis that is not a multiple of 8 rows, as 2 * Hkv is at 1 or 3 kv heads per chip (found by compiling for
v5e and v6e), so a page lands whole and a head's K and V are loaded one row per token, converted to float32 and
multiplied by their scale column, in q's dtype for the MXU.
Block sizes per TPU generation: BLOCKS. Tolerances vs the reference in tests (atol = rtol): 2e-5 f32, 3e-2 bf16.
Interpret mode (CPU): `interpret=True` runs the kernel in Pallas' generic interpreter (the TPU interpreter,
`pltpu.InterpretParams`, cannot yet reshape a ref, which `_head_kv` does).
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import reference
from . import tiles as tiles_lib

MASK_VALUE = -1e30
ROW_ALIGN = 16        # sublane tile of bf16 (f32 needs 8): keeps row blocks tileable for both


class Blocks(NamedTuple):
    block_kv: int         # kv positions per block (per DMA round and score matmul)
    prefill_q_tile: int   # query tokens per tile when tokens outnumber sequences


# Chosen from each chip's MXU width and default scoped VMEM, not measured (no TPU was lent):
# - v5e: four 128x128 MXUs and 16 MiB of scoped VMEM: 256 kv positions are two MXU passes per score matmul; the
#   two kv slots take 2 x 256 x 16 x 128 x 2 B = 2 MiB at 8 kv heads in bf16 (heads padded to the 16-row tile).
# - v6e: two 256x256 MXUs and 32 MiB: blocks of 512 and prefill tiles of 32 tokens (rows = 32 x group heads)
#   fill the wider MXU; the kv slots take 4 MiB.
BLOCKS = {"v5e": Blocks(256, 16), "v6e": Blocks(512, 32)}
DEFAULT_GENERATION = "v5e"   # the smaller budget: safe on any chip


def generation(device_kind: str) -> str | None:
    """BLOCKS' key for a jax device_kind ("TPU v5 lite" -> "v5e", "TPU v6 lite" -> "v6e"); None if unknown."""
    kind = device_kind.lower()
    if "v6" in kind:
        return "v6e"
    if "v5 lite" in kind or "v5e" in kind:
        return "v5e"
    return None


def _head_kv(block, h):
    """K and V of kv head h from block [block_kv, 2 * Hkv, D] in VMEM, each [block_kv, D], by sublane-strided loads
    of the block flattened to rows. 16-bit data packs two rows per 32-bit sublane word, so rows 2h and 2h + 1, a
    token's K and V of head h, share a word: load the words of head h (stride Hkv) and split their halves. 8-bit
    codes (a block not padded: see the module docstring) are loaded per row and returned as float32 values."""
    block_kv, two_hkv, d = block.shape          # two_hkv: 2 * Hkv rounded up to the sublane tile (16/32-bit)
    if block.dtype.itemsize == 1:
        return block[:, 2 * h, :].astype(jnp.float32), block[:, 2 * h + 1, :].astype(jnp.float32)
    rows = block.reshape(block_kv * two_hkv, d)
    if rows.dtype.itemsize == 4:
        return rows[pl.ds(2 * h, block_kv, stride=two_hkv), :], rows[pl.ds(2 * h + 1, block_kv, stride=two_hkv), :]
    words = rows.bitcast(jnp.uint32)[pl.ds(h, block_kv, stride=two_hkv // 2), :]      # [block_kv, D] uint32
    half = lambda w: pltpu.bitcast(w, jnp.float32).astype(rows.dtype)   # the high half is a bf16's float32
    return half(words << 16), half(words & jnp.uint32(0xFFFF0000))


def _kernel(seq_ref, first_ref, nblk_ref, start_ref, len_ref, pos0_ref, boff_ref, slots_ref,  # SMEM prefetch
            q_ref, pos_ref, tables_hbm, new_hbm, kv_in, *refs,                                # inputs
            pages_per_block, sm_scale, sliding_window, soft_cap, quantized):
    # refs: [scales_hbm,] o_ref, kv_hbm (outputs), table, table_sem, buf, buf_sem, write_sem[, sbuf, sbuf_sem]
    # (scratch). q_ref/o_ref: [Hkv, rows, D]; pos_ref: [rows, 1]; tables_hbm: [S, P]; new_hbm: [T, 2 * Hkv, D];
    # kv_hbm: [P, page_size, 2 * Hkv, D], aliased to kv_in (the cache, updated in place);
    # table: [2, P] SMEM, the block-table rows of this tile and the next; buf: [2, block_kv, 2 * Hkv rounded up
    # to the sublane tile (not for 8-bit codes), D] (rows past 2 * Hkv are never written or read).
    # Quantized: scales_hbm [P, page_size, 2 * Hkv] f32 (this step's rows already written), sbuf
    # [2, block_kv, 2 * Hkv] their blocks.
    del kv_in
    scales_hbm, refs = (refs[0], refs[1:]) if quantized else (None, refs)
    o_ref, kv_hbm, table, table_sem, buf, buf_sem, write_sem, *scale_scratch = refs
    sbuf, sbuf_sem = scale_scratch or (None, None)
    i, nt = pl.program_id(0), pl.num_programs(0)
    page_size = kv_hbm.shape[1]
    block_kv, hkv = buf.shape[1], kv_hbm.shape[2] // 2
    nxt = jnp.minimum(i + 1, nt - 1)
    has_next = (i + 1 < nt) & (nblk_ref[nxt] > 0)

    def table_copy(j):
        return pltpu.make_async_copy(tables_hbm.at[seq_ref[j]], table.at[lax.rem(j, 2)], table_sem.at[lax.rem(j, 2)])

    def token_copy(j, t):
        # Every token of a tile belongs to a sequence, so its slot is valid (>= 0).
        slot = slots_ref[start_ref[j] + t]
        return pltpu.make_async_copy(new_hbm.at[start_ref[j] + t],
                                     kv_hbm.at[lax.div(slot, page_size), lax.rem(slot, page_size)], write_sem.at[0])

    def write_tokens(j, action):
        def step(t, carry):
            getattr(token_copy(j, t), action)()
            return carry
        lax.fori_loop(0, len_ref[j], step, 0)

    def block_copies(j, blk, slot):
        last_page = lax.div(pos0_ref[j] + len_ref[j] - 1, page_size)      # the tile's last token's page
        row = lax.rem(j, 2)
        pages = [table[row, jnp.minimum(blk * pages_per_block + p, last_page)] for p in range(pages_per_block)]
        rows = lambda p: buf.at[slot, pl.ds(p * page_size, page_size)]
        dest = (lambda p: rows(p).at[:, pl.ds(0, 2 * hkv)]) if buf.shape[2] > 2 * hkv else rows
        copies = [pltpu.make_async_copy(kv_hbm.at[page], dest(p), buf_sem.at[slot]) for p, page in enumerate(pages)]
        if quantized:
            copies += [pltpu.make_async_copy(scales_hbm.at[page], sbuf.at[slot, pl.ds(p * page_size, page_size)],
                                             sbuf_sem.at[slot]) for p, page in enumerate(pages)]
        return copies

    @pl.when((i == 0) & (nblk_ref[0] > 0))
    def _():
        table_copy(0).start()
        write_tokens(0, "start")
        table_copy(0).wait()
        write_tokens(0, "wait")
        for c in block_copies(0, first_ref[0], 0):
            c.start()

    @pl.when(has_next)
    def _():
        table_copy(nxt).start()
        write_tokens(nxt, "start")

    nblk, first, end = nblk_ref[i], first_ref[i], pos0_ref[i] + len_ref[i]
    pos = pos_ref[...]                                                       # [rows, 1]
    rows, d = pos.shape[0], q_ref.shape[-1]
    dot_dtype = o_ref.dtype if quantized else buf.dtype
    qs = [(q_ref[h].astype(jnp.float32) * sm_scale).astype(dot_dtype) for h in range(hkv)]   # [rows, D] each

    def body(b, carry):
        slot = lax.rem(boff_ref[i] + b, 2)
        blk = first + b

        @pl.when(b + 1 < nblk)
        def _():
            for c in block_copies(i, blk + 1, 1 - slot):
                c.start()

        @pl.when((b + 1 == nblk) & has_next)
        def _():
            table_copy(nxt).wait()
            write_tokens(nxt, "wait")
            for c in block_copies(nxt, first_ref[nxt], 1 - slot):
                c.start()

        for c in block_copies(i, blk, slot):
            c.wait()
        row_pos = blk * block_kv + lax.broadcasted_iota(jnp.int32, (block_kv, 1), 0)
        kv_pos = blk * block_kv + lax.broadcasted_iota(jnp.int32, (rows, block_kv), 1)
        mask = kv_pos <= pos
        if sliding_window is not None:
            mask &= kv_pos > pos - sliding_window
        out = []
        for h in range(hkv):
            m_i, l_i, acc = carry[3 * h:3 * h + 3]         # [rows, 1], [rows, 1], [rows, D] f32
            k, v = _head_kv(buf.at[slot], h)                                 # [block_kv, D]
            if quantized:                                                    # codes times their scale columns
                k = (k * sbuf[slot, :, pl.ds(2 * h, 1)]).astype(dot_dtype)
                v = (v * sbuf[slot, :, pl.ds(2 * h + 1, 1)]).astype(dot_dtype)
            v = jnp.where(row_pos >= end, jnp.zeros_like(v), v)             # past this tile's last token
            s = lax.dot_general(qs[h], k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            s = jnp.where(mask, s, MASK_VALUE)
            m_new = jnp.maximum(m_i, s.max(axis=1, keepdims=True))
            p = jnp.exp(s - m_new)
            alpha = jnp.exp(m_i - m_new)
            pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            out += [m_new, alpha * l_i + p.sum(axis=1, keepdims=True), alpha * acc + pv]
        return tuple(out)

    init = (jnp.full((rows, 1), MASK_VALUE, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, d), jnp.float32)) * hkv
    final = lax.fori_loop(0, nblk, body, init)
    for h in range(hkv):
        _, l_f, acc = final[3 * h:3 * h + 3]
        o_ref[h] = (acc / jnp.maximum(l_f, 1e-30)).astype(o_ref.dtype)


def ragged_paged_attention(q, k, v, kv_pages, slot_mapping, kv_lens, block_tables, cu_q_lens, num_seqs, *,
                           sm_scale, sliding_window=None, soft_cap=None, generation=None, block_kv=None,
                           q_tile=None, interpret=False):
    # q: [T, Hq, D]; k/v: [T, Hkv, D]; kv_pages: [P, page_size, 2 * Hkv, D] or (codes, scales) (reference.py);
    # returns (out [T, Hq, D], kv_pages).
    # generation: a BLOCKS key (the engine passes its chip's); block_kv / q_tile override its sizes.
    quantized = isinstance(kv_pages, tuple)
    codes, scales = kv_pages if quantized else (kv_pages, None)
    t, hq, d = q.shape
    num_pages, page_size, two_hkv, _ = codes.shape
    hkv = two_hkv // 2
    s, pages_per_seq = block_tables.shape
    g = hq // hkv
    blocks = BLOCKS[generation or DEFAULT_GENERATION]
    q_tile = q_tile or tiles_lib.default_q_tile(t, s, prefill=blocks.prefill_q_tile)
    ppb = max(1, min((block_kv or blocks.block_kv) // page_size, pages_per_seq))
    plan = tiles_lib.plan(cu_q_lens, num_seqs, kv_lens, num_tokens=t, q_tile=q_tile,
                          kv_block=ppb * page_size, sliding_window=sliding_window)
    m = q_tile * g
    rows = -(-m // ROW_ALIGN) * ROW_ALIGN
    qt = jnp.pad(tiles_lib.gather_q(q, plan, q_tile, hkv), ((0, 0), (0, 0), (0, rows - m), (0, 0)))
    qt = qt.transpose(1, 0, 2, 3)                                             # [NT, Hkv, rows, D]
    pos = jnp.pad(tiles_lib.row_positions(plan, q_tile, g), ((0, 0), (0, rows - m)),
                  constant_values=-1)[..., None]                            # [NT, rows, 1]
    nt = pos.shape[0]
    block_offset = jnp.cumsum(plan.num_blocks) - plan.num_blocks             # blocks of the tiles before
    tile = 8 * (4 // codes.dtype.itemsize)   # sublanes of a VMEM tile: the heads axis of buf rounds up to it
    heads = two_hkv if quantized else -(-two_hkv // tile) * tile            # (8-bit codes: not padded)
    kernel = functools.partial(_kernel, pages_per_block=ppb, sm_scale=sm_scale, sliding_window=sliding_window,
                               soft_cap=soft_cap, quantized=quantized)
    tile_block = pl.BlockSpec((None, hkv, rows, d), lambda i, *_: (i, 0, 0, 0))
    any_space = pl.BlockSpec(memory_space=pl.ANY)
    prefetch = (plan.seq, plan.first_block, plan.num_blocks, plan.start, plan.length, plan.pos0,
                block_offset.astype(jnp.int32), slot_mapping.astype(jnp.int32))
    if quantized:
        new, new_scales = reference.quantize_rows(reference.interleave(k, v, jnp.float32), codes.dtype)
        scales = reference.write_slots(scales, new_scales, slot_mapping)
    else:
        new = reference.interleave(k, v, codes.dtype)
    scale_scratch = [pltpu.VMEM((2, ppb * page_size, two_hkv), jnp.float32),
                     pltpu.SemaphoreType.DMA((2,))] if quantized else []
    out, codes = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((nt, hkv, rows, d), q.dtype),
                   jax.ShapeDtypeStruct(codes.shape, codes.dtype)),
        cost_estimate=tiles_lib.attention_cost(q, codes, s, pages_per_seq),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(nt,),
            in_specs=[tile_block, pl.BlockSpec((None, rows, 1), lambda i, *_: (i, 0, 0)),
                      any_space, any_space, any_space] + [any_space] * quantized,
            out_specs=(tile_block, any_space),
            scratch_shapes=[pltpu.SMEM((2, pages_per_seq), jnp.int32), pltpu.SemaphoreType.DMA((2,)),
                            pltpu.VMEM((2, ppb * page_size, heads, d), codes.dtype),
                            pltpu.SemaphoreType.DMA((2,)), pltpu.SemaphoreType.DMA((1,)), *scale_scratch]),
        input_output_aliases={len(prefetch) + 4: 1},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=interpret,
    )(*prefetch, qt, pos, block_tables.astype(jnp.int32), new, codes, *([scales] if quantized else []))
    out = out.transpose(1, 0, 2, 3)[:, :, :m]
    return tiles_lib.scatter_out(out, plan, cu_q_lens, num_seqs, q_tile, t), ((codes, scales) if quantized else codes)
