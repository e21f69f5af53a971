"""Random ragged batches (kernels_pallas.random_batch) and a naive numpy attention, shared by the kernel tests
(fixture `kv`)."""
import types

import numpy as np
import pytest
import jax.numpy as jnp

from kernels_pallas.random_batch import args, make_batch


def naive_cache(b):
    """The cache after this step: each token's K/V at its slot, K of head h at 2h and V at 2h + 1 (float64)."""
    f = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    kv = f(b.kv_pages).copy()
    num_pages, ps, two_hkv, d = kv.shape
    flat = kv.reshape(-1, two_hkv, d)
    k, v, slots = f(b.k), f(b.v), np.asarray(b.slot_mapping)
    for t, slot in enumerate(slots):
        if slot >= 0:
            flat[slot, 0::2], flat[slot, 1::2] = k[t], v[t]
    return kv


def naive_attention(b, *, sm_scale, sliding_window=None, soft_cap=None):
    """Per-token loop in float64 numpy, written from the spec alone."""
    q = np.asarray(jnp.asarray(b.q, jnp.float32), np.float64)
    kv = naive_cache(b)
    lens, tables, cu = (np.asarray(x) for x in (b.kv_lens, b.block_tables, b.cu_q_lens))
    _, ps, two_hkv, d = kv.shape
    hkv = two_hkv // 2
    g = q.shape[1] // hkv
    out = np.zeros_like(q)
    for s in range(int(b.num_seqs[0])):
        kl, ql = lens[s], cu[s + 1] - cu[s]
        pages = tables[s, :-(-kl // ps)]
        rows = kv[pages].reshape(-1, two_hkv, d)[:kl]             # [kl, 2 * Hkv, D]
        k, v = rows[:, 0::2].transpose(1, 0, 2), rows[:, 1::2].transpose(1, 0, 2)   # [Hkv, kl, D]
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
    return types.SimpleNamespace(make_batch=make_batch, args=args, naive=naive_attention, naive_cache=naive_cache)
