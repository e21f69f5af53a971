"""Ragged paged attention (with its KV-cache write) for TPU, GPU and CPU; and a grouped matmul (grouped_matmul.py:
ragged_dot and a Pallas GPU kernel with one signature) for mixtures of experts.

Attention has one dispatch point, selected by `backend`:
- "reference":  pure jnp (reference.py), the CPU production path and the test oracle;
- "pallas_tpu": Pallas TPU / Mosaic kernels (tpu.py);
- "pallas_gpu": Pallas GPU / Triton kernels (gpu.py).
Pass `interpret=True` (a tuning keyword) with a Pallas backend to run it in the Pallas interpreter
on CPU; that is how the tests check the kernels against the reference without the hardware.
Other tuning keywords (block_kv, q_tile, ...) go to the chosen implementation; see its docstring.
This package imports only jax and numpy, never jaxserve.
"""
from . import reference

BACKENDS = ("reference", "pallas_tpu", "pallas_gpu")


def _impl(backend):
    if backend == "reference":
        return reference
    if backend == "pallas_tpu":
        from . import tpu
        return tpu
    if backend == "pallas_gpu":
        from . import gpu
        return gpu
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")


def ragged_paged_attention(q, k, v, kv_pages, slot_mapping, kv_lens, block_tables, cu_q_lens, num_seqs, *,
                           sm_scale, sliding_window=None, soft_cap=None, backend="reference", **tuning):
    """Store this step's K/V in the paged cache, then run causal attention of a flat ragged batch over it.

    q: [T, Hq, D]; k/v: [T, Hkv, D] this step's keys and values, stored at slot_mapping [T] int32
    (page * page_size + offset; negative = padding, skipped);
    kv_pages: [P, page_size, 2 * Hkv, D], K of kv head h at 2h and V at 2h + 1 (one token's K/V of every
    head is one contiguous row, so a page is one DMA and a token one leading-dim write; see tpu.py);
    kv_lens: [S] int32 context length incl. this step; block_tables: [S, pages_per_seq] int32;
    cu_q_lens: [S+1] int32 query offsets; num_seqs: [1] int32 valid sequences.
    Returns (out [T, Hq, D] in q's dtype with zero rows for padding tokens, updated kv_pages: donate it).
    """
    return _impl(backend).ragged_paged_attention(
        q, k, v, kv_pages, slot_mapping, kv_lens, block_tables, cu_q_lens, num_seqs, sm_scale=sm_scale,
        sliding_window=sliding_window, soft_cap=soft_cap, **tuning)
