"""Attention over a paged float32 KV cache on XLA:CPU (paged_attention.cc): each query token attends over its
sequence's cached positions, as kernels_pallas.reference.attend computes it, whose signature it takes. A token's
output is computed the same way whatever else the batch holds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "jaxserve_paged_attention"  # the FFI target (kernels_cpu.enabled(TARGET): registered)


def paged_attention(q, kv_pages, kv_lens, block_tables, cu_q_lens, num_seqs, *, sm_scale, sliding_window=None,
                    soft_cap=None):
    """q [T, Hq, D] (D a multiple of 8), kv_pages [P, page_size, 2 * Hkv, D] float32 already holding this step's
    K/V, kv_lens [S], block_tables [S, pages_per_seq], cu_q_lens [S + 1], num_seqs [1] -> [T, Hq, D] in q's dtype,
    zero rows for padding tokens. XLA:CPU only. Each token reads its whole range once per kv head (a long prefill
    chunk rereads its context per token, where the reference reads each block once per 16 tokens)."""
    t, s = q.shape[0], kv_lens.shape[0]
    token = jnp.arange(t, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(cu_q_lens[1:], token, side="right"), s - 1).astype(jnp.int32)
    live = token < cu_q_lens[num_seqs[0]]
    pos = jnp.where(live, kv_lens[seq] - (cu_q_lens[seq + 1] - token), -1).astype(jnp.int32)  # its kv position
    out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        q.astype(jnp.float32), kv_pages, block_tables.astype(jnp.int32), seq, pos, sm_scale=np.float32(sm_scale),
        window=np.int64(sliding_window or 0), soft_cap=np.float32(soft_cap or 0))
    return out.astype(q.dtype)
