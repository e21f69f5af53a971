"""Pallas TPU (Mosaic) ragged paged attention and KV-cache write.

Attention
- Work items are the query tiles of tiles.py (up to `q_tile` tokens of one sequence each). Rows of a
  tile are (token, query head of one kv-head group), padded to a multiple of 16 so every block is
  (8,128)/(16,128)-tileable in f32/bf16; blocks cover the full last two dims, so head_dim 64 works too.
- grid = (Hkv, NT), both "parallel". q/out blocks [rows, D] and row positions [rows, 1] come through
  BlockSpecs; the tile plan, kv lengths and last pages are scalar-prefetched into SMEM.
  The block tables stay in HBM: each tile copies its sequence's row ([P] int32) into SMEM before its
  first page DMA, so SMEM use is bounded by one sequence's table (max_num_seqs x P would not fit SMEM
  at long contexts: 2 MiB for 256 sequences of 32k tokens in pages of 16, SMEM is 1 MiB).
- K/V pages stay in HBM (memory_space ANY). A kv block is `block_kv // page_size` pages; each page is
  one async copy into a 2-slot VMEM buffer [2, block_kv, D]: block b+1 is in flight while block b is
  computed (double buffering). Each tile visits only the blocks its causal / sliding-window range
  needs; page ids past a sequence's last page are clamped to it, so no DMA leaves the sequence, and
  V rows past the sequence's length are zeroed (a reused page may hold anything, even NaN).
- Online softmax in float32 with the matmuls on the MXU in the cache dtype (f32 or bf16 operands,
  f32 accumulation). Tolerances vs the reference in tests (atol = rtol): 2e-5 f32, 3e-2 bf16.
KV write
- Tokens are sorted by slot (padding last) in the wrapper, so each (8|16)-row tile of a page is hit
  by one consecutive run of grid steps; grid = (T,), "arbitrary". Scalar-prefetched page / tile /
  row / first-of-run / valid / token order drive the BlockSpec index maps, and Pallas pipelines the
  [Hkv, tile_rows, D] page tiles in and out (double-buffered). The first step of a run copies the
  tile into the output block, each valid step overwrites its row (an iota mask, no dynamic store),
  and the block is written back once when the run ends. Single-row DMAs are not used: Mosaic needs
  tile-aligned DMA offsets. The caches are aliased to the outputs (input_output_aliases), so the
  update is in place when donated.
Interpret mode (CPU): `interpret=True` runs both through the Pallas TPU interpreter.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import tiles as tiles_lib

MASK_VALUE = -1e30
ROW_ALIGN = 16        # sublane tile of bf16 (f32 needs 8): keeps row blocks tileable for both


def _attention_kernel(seq_ref, first_ref, nblk_ref, kv_lens_ref, last_page_ref,  # SMEM prefetch
                      q_ref, pos_ref, tables_hbm, k_hbm, v_hbm,               # inputs
                      o_ref,                                                  # output
                      table, table_sem, k_buf, v_buf, sem,                    # scratch
                      *, pages_per_block, sm_scale, sliding_window, soft_cap):
    # q_ref/o_ref: [rows, D]; pos_ref: [rows, 1]; tables_hbm: [S, P]; k_hbm/v_hbm: [Hkv, pages, page_size, D];
    # table: [P] SMEM, the tile's sequence's block table; k_buf/v_buf: [2, block_kv, D];
    # sem: DMA semaphores [2 slots, K/V].
    h, i = pl.program_id(0), pl.program_id(1)
    seq, first, nblk = seq_ref[i], first_ref[i], nblk_ref[i]
    kv_len, last_page = kv_lens_ref[seq], last_page_ref[seq]
    page_size = k_hbm.shape[2]
    block_kv = k_buf.shape[1]

    def copies(blk, slot):
        out = []
        for j in range(pages_per_block):
            page = table[jnp.minimum(blk * pages_per_block + j, last_page)]
            rows = pl.ds(j * page_size, page_size)
            out.append(pltpu.make_async_copy(k_hbm.at[h, page], k_buf.at[slot, rows], sem.at[slot, 0]))
            out.append(pltpu.make_async_copy(v_hbm.at[h, page], v_buf.at[slot, rows], sem.at[slot, 1]))
        return out

    # Only this sequence's block table comes into SMEM (the whole [S, P] table would not fit at long contexts).
    @pl.when(nblk > 0)
    def _():
        fetch = pltpu.make_async_copy(tables_hbm.at[seq], table, table_sem.at[0])
        fetch.start()
        fetch.wait()
        for c in copies(first, 0):
            c.start()

    q = (q_ref[...].astype(jnp.float32) * sm_scale).astype(k_buf.dtype)      # [rows, D]
    pos = pos_ref[...]                                                        # [rows, 1]
    rows, d = q.shape

    def body(b, carry):
        m_i, l_i, acc = carry                         # [rows, 1], [rows, 1], [rows, D] f32
        slot = b % 2
        blk = first + b

        @pl.when(b + 1 < nblk)
        def _():
            for c in copies(blk + 1, 1 - slot):
                c.start()

        for c in copies(blk, slot):
            c.wait()
        k, v = k_buf[slot], v_buf[slot]               # [block_kv, D]
        # Rows past the sequence's end hold whatever a reused page held (even NaN): masking their scores is not
        # enough (0 * NaN in p @ v), so they are zeroed.
        stale = blk * block_kv + lax.broadcasted_iota(jnp.int32, (block_kv, 1), 0) >= kv_len
        v = jnp.where(stale, jnp.zeros_like(v), v)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        kv_pos = blk * block_kv + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        mask = kv_pos <= pos
        if sliding_window is not None:
            mask &= kv_pos > pos - sliding_window
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m_i, s.max(axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        alpha = jnp.exp(m_i - m_new)
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, alpha * l_i + p.sum(axis=1, keepdims=True), alpha * acc + pv

    init = (jnp.full((rows, 1), MASK_VALUE, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, d), jnp.float32))
    _, l_f, acc = lax.fori_loop(0, nblk, body, init)
    o_ref[...] = (acc / jnp.maximum(l_f, 1e-30)).astype(o_ref.dtype)


def ragged_paged_attention(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs, *,
                           sm_scale, sliding_window=None, soft_cap=None, block_kv=256, q_tile=None,
                           interpret=False):
    # q: [T, Hq, D]; k_pages/v_pages: [Hkv, P, page_size, D]; returns [T, Hq, D] in q's dtype.
    t, hq, d = q.shape
    hkv, _, page_size, _ = k_pages.shape
    s, pages_per_seq = block_tables.shape
    g = hq // hkv
    q_tile = q_tile or tiles_lib.default_q_tile(t, s)
    ppb = max(1, min(block_kv // page_size, pages_per_seq))
    plan = tiles_lib.plan(cu_q_lens, num_seqs, kv_lens, num_tokens=t, q_tile=q_tile,
                          kv_block=ppb * page_size, sliding_window=sliding_window)
    m = q_tile * g
    rows = -(-m // ROW_ALIGN) * ROW_ALIGN
    qt = jnp.pad(tiles_lib.gather_q(q, plan, q_tile, hkv), ((0, 0), (0, 0), (0, rows - m), (0, 0)))
    pos = jnp.pad(tiles_lib.row_positions(plan, q_tile, g), ((0, 0), (0, rows - m)),
                  constant_values=-1)[..., None]                            # [NT, rows, 1]
    nt = pos.shape[0]
    last_page = (jnp.maximum(kv_lens - 1, 0) // page_size).astype(jnp.int32)  # [S]
    kernel = functools.partial(_attention_kernel, pages_per_block=ppb, sm_scale=sm_scale,
                               sliding_window=sliding_window, soft_cap=soft_cap)
    tile_block = pl.BlockSpec((None, None, rows, d), lambda h, i, *_: (h, i, 0, 0))
    any_space = pl.BlockSpec(memory_space=pl.ANY)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((hkv, nt, rows, d), q.dtype),
        cost_estimate=tiles_lib.attention_cost(q, k_pages, s, pages_per_seq),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(hkv, nt),
            in_specs=[tile_block, pl.BlockSpec((None, rows, 1), lambda h, i, *_: (i, 0, 0)),
                      any_space, any_space, any_space],
            out_specs=tile_block,
            scratch_shapes=[pltpu.SMEM((pages_per_seq,), jnp.int32), pltpu.SemaphoreType.DMA((1,)),
                            pltpu.VMEM((2, ppb * page_size, d), k_pages.dtype),
                            pltpu.VMEM((2, ppb * page_size, d), v_pages.dtype),
                            pltpu.SemaphoreType.DMA((2, 2))]),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=pltpu.InterpretParams() if interpret else False,
    )(plan.seq, plan.first_block, plan.num_blocks, kv_lens.astype(jnp.int32), last_page, qt, pos,
      block_tables.astype(jnp.int32), k_pages, v_pages)
    return tiles_lib.scatter_out(out[:, :, :m], plan, cu_q_lens, num_seqs, q_tile, t)


def _write_kernel(page_ref, tile_ref, row_ref, first_ref, valid_ref, order_ref,   # SMEM prefetch
                  k_new, v_new, k_in, v_in, k_out, v_out):
    # k_new/v_new: [Hkv, 1, D] this step's token; k_in/k_out (v_*): [Hkv, rows, D], one row tile of
    # the page that receives the token. k_out stays in VMEM while consecutive steps hit the same tile.
    del page_ref, tile_ref, order_ref
    g = pl.program_id(0)

    @pl.when(first_ref[g] == 1)
    def _():
        k_out[...] = k_in[...]
        v_out[...] = v_in[...]

    @pl.when(valid_ref[g] == 1)
    def _():
        hit = lax.broadcasted_iota(jnp.int32, k_out.shape, 1) == row_ref[g]
        k_out[...] = jnp.where(hit, k_new[...], k_out[...])
        v_out[...] = jnp.where(hit, v_new[...], v_out[...])


def write_kv(k_pages, v_pages, k_new, v_new, slot_mapping, *, interpret=False):
    # k_pages/v_pages: [Hkv, P, page_size, D]; k_new/v_new: [T, Hkv, D]; slot_mapping: [T] int32.
    hkv, _, page_size, d = k_pages.shape
    t = slot_mapping.shape[0]
    rows = min(page_size, 32 // k_pages.dtype.itemsize)       # one sublane tile: 8 f32, 16 bf16
    valid = slot_mapping >= 0
    order = jnp.argsort(jnp.where(valid, slot_mapping, jnp.iinfo(jnp.int32).max), stable=True)
    slots = slot_mapping[order]                                  # valid slots ascending, padding last
    last = slots[jnp.maximum(jnp.sum(valid) - 1, 0)]
    slots = jnp.where(slots >= 0, slots, jnp.maximum(last, 0))  # padding steps revisit the last tile
    tile = slots // rows                                         # global row-tile id
    first = jnp.concatenate([jnp.ones((1,), bool), tile[1:] != tile[:-1]])
    per_page = page_size // rows
    new_block = pl.BlockSpec((None, hkv, 1, d), lambda g, page, tl, row, fst, ok, order: (order[g], 0, 0, 0))
    page_block = pl.BlockSpec((hkv, None, rows, d), lambda g, page, tl, *_: (0, page[g], tl[g], 0))
    to_rows = lambda x, dt: x.astype(dt)[:, :, None, :]           # [T, Hkv, 1, D]
    return pl.pallas_call(
        _write_kernel,
        cost_estimate=pl.CostEstimate(flops=0, transcendentals=0,  # each token's page tile read and written
                                      bytes_accessed=4 * t * hkv * rows * d * k_pages.dtype.itemsize),
        out_shape=(jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                   jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6, grid=(t,), in_specs=[new_block, new_block, page_block, page_block],
            out_specs=(page_block, page_block)),
        input_output_aliases={8: 0, 9: 1},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=pltpu.InterpretParams() if interpret else False,
    )(tile // per_page, tile % per_page, slots % rows, first.astype(jnp.int32),
      (slot_mapping[order] >= 0).astype(jnp.int32), order.astype(jnp.int32),
      to_rows(k_new, k_pages.dtype), to_rows(v_new, v_pages.dtype), k_pages, v_pages)
