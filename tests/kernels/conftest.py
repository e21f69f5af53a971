"""Random ragged batches (kernels_pallas.random_batch) and a naive numpy attention, shared by the kernel tests
(fixture `kv`)."""
import types

import numpy as np
import pytest
import jax.numpy as jnp

from kernels_pallas.random_batch import args, make_batch


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
