"""Random ragged batches and a naive numpy attention, shared by the kernel tests (fixture `kv`)."""
import types

import numpy as np
import pytest
import jax.numpy as jnp


def make_batch(rng, *, q_lens, kv_lens, page_size, hq, hkv, d, dtype, num_tokens, max_seqs,
               pages_per_seq, extra_pages=3):
    """A padded batch whose sequences live on shuffled pages; unused pages hold random data too."""
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
    as_dtype = lambda a: jnp.asarray(a, jnp.float32).astype(dtype)
    return types.SimpleNamespace(
        q=as_dtype(rng.standard_normal((num_tokens, hq, d))),
        k_pages=as_dtype(rng.standard_normal((hkv, num_pages, page_size, d))),
        v_pages=as_dtype(rng.standard_normal((hkv, num_pages, page_size, d))),
        kv_lens=jnp.asarray(lens, jnp.int32), block_tables=jnp.asarray(tables, jnp.int32),
        cu_q_lens=jnp.asarray(cu, jnp.int32), num_seqs=jnp.asarray([n], jnp.int32))


def args(b):
    return (b.q, b.k_pages, b.v_pages, b.kv_lens, b.block_tables, b.cu_q_lens, b.num_seqs)


def naive_attention(b, *, sm_scale, sliding_window=None, soft_cap=None):
    """Per-token loop in float64 numpy, written from the spec alone."""
    f = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    q, kp, vp = f(b.q), f(b.k_pages), f(b.v_pages)
    lens, tables, cu = (np.asarray(x) for x in (b.kv_lens, b.block_tables, b.cu_q_lens))
    hkv, _, ps, d = kp.shape
    g = q.shape[1] // hkv
    out = np.zeros_like(q)
    for s in range(int(b.num_seqs[0])):
        kl, ql = lens[s], cu[s + 1] - cu[s]
        pages = tables[s, :-(-kl // ps)]
        k = kp[:, pages].reshape(hkv, -1, d)[:, :kl]             # [Hkv, kl, D]
        v = vp[:, pages].reshape(hkv, -1, d)[:, :kl]
        for j in range(ql):
            p = kl - ql + j
            lo = 0 if sliding_window is None else max(0, p - sliding_window + 1)
            for h in range(q.shape[1]):
                sc = sm_scale * k[h // g, lo:p + 1] @ q[cu[s] + j, h]
                if soft_cap is not None:
                    sc = soft_cap * np.tanh(sc / soft_cap)
                w = np.exp(sc - sc.max())
                out[cu[s] + j, h] = (w / w.sum()) @ v[h // g, lo:p + 1]
    return out


@pytest.fixture
def kv():
    return types.SimpleNamespace(make_batch=make_batch, args=args, naive=naive_attention)
