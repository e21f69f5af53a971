"""Random ragged batches over a paged KV cache, for checking the kernels against the reference: the kernel
tests and bench/device_check.py (on a GPU) build their cases with the same function."""
import types

import jax.numpy as jnp
import numpy as np


def make_batch(rng, *, q_lens, kv_lens, page_size, hq, hkv, d, dtype, num_tokens, max_seqs,
               pages_per_seq, extra_pages=3):
    """A padded batch whose sequences live on shuffled pages: the cache holds each sequence's earlier context and
    random data everywhere else (this step's slots too, until the call writes them); k/v are this step's."""
    n = len(q_lens)
    assert n <= max_seqs and sum(q_lens) <= num_tokens
    assert all(0 < ql <= kl for ql, kl in zip(q_lens, kv_lens))
    need = [-(-kl // page_size) for kl in kv_lens]
    assert max(need) <= pages_per_seq
    num_pages = sum(need) + extra_pages
    perm = rng.permutation(num_pages)
    tables = rng.integers(0, num_pages, (max_seqs, pages_per_seq))   # garbage past each sequence
    used = 0
    for s, k in enumerate(need):
        tables[s, :k] = perm[used:used + k]
        used += k
    cu = np.zeros(max_seqs + 1, np.int64)
    cu[1:n + 1] = np.cumsum(q_lens)
    cu[n + 1:] = cu[n]
    lens = np.zeros(max_seqs, np.int64)
    lens[:n] = kv_lens
    slots = np.full(num_tokens, -1, np.int64)                          # padding tokens: -1
    for s, (ql, kl) in enumerate(zip(q_lens, kv_lens)):
        pos = np.arange(kl - ql, kl)
        slots[cu[s]:cu[s] + ql] = tables[s, pos // page_size] * page_size + pos % page_size
    as_dtype = lambda a: jnp.asarray(a, jnp.float32).astype(dtype)
    return types.SimpleNamespace(
        q=as_dtype(rng.standard_normal((num_tokens, hq, d))),
        k=as_dtype(rng.standard_normal((num_tokens, hkv, d))),
        v=as_dtype(rng.standard_normal((num_tokens, hkv, d))),
        kv_pages=as_dtype(rng.standard_normal((num_pages, page_size, 2 * hkv, d))),
        slot_mapping=jnp.asarray(slots, jnp.int32),
        kv_lens=jnp.asarray(lens, jnp.int32), block_tables=jnp.asarray(tables, jnp.int32),
        cu_q_lens=jnp.asarray(cu, jnp.int32), num_seqs=jnp.asarray([n], jnp.int32))


def args(b):
    return (b.q, b.k, b.v, b.kv_pages, b.slot_mapping, b.kv_lens, b.block_tables, b.cu_q_lens, b.num_seqs)
