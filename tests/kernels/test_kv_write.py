"""The cache write inside ragged_paged_attention: every backend stores exactly this step's tokens at their slots
(padding tokens nowhere), a batch of padding changes nothing, and the TPU kernel updates the cache in place."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_pallas
from kernels_pallas import tpu

BACKENDS = {"reference": {}, "pallas_tpu": {"interpret": True, "block_kv": 32},
            "pallas_gpu": {"interpret": True, "block_kv": 32}}


def batch(kv, dtype, page_size, seed=0):
    """Prefill chunks of several query tiles next to decodes; padding tokens and sequences after them."""
    rng = np.random.default_rng(seed)
    return kv.make_batch(rng, q_lens=[37, 1, 20, 1], kv_lens=[37, 50, 45, 3], page_size=page_size, hq=6, hkv=3,
                         d=64, dtype=dtype, num_tokens=64, max_seqs=6, pages_per_seq=8)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype,page_size", [(jnp.float32, 16), (jnp.bfloat16, 16), (jnp.bfloat16, 32)])
def test_writes_exactly_the_step_slots(kv, backend, dtype, page_size):
    b = batch(kv, dtype, page_size)
    _, cache = kernels_pallas.ragged_paged_attention(*kv.args(b), sm_scale=0.125, backend=backend,
                                                     **BACKENDS[backend])
    assert cache.dtype == b.kv_pages.dtype and cache.shape == b.kv_pages.shape
    np.testing.assert_array_equal(np.asarray(cache, np.float64), kv.naive_cache(b))


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_batch_of_padding_changes_nothing(kv, backend):
    b = batch(kv, jnp.float32, 16)
    args = list(kv.args(b))
    args[4] = jnp.full_like(b.slot_mapping, -1)                       # slot_mapping
    args[7] = jnp.zeros_like(b.cu_q_lens)                             # cu_q_lens
    args[8] = jnp.zeros_like(b.num_seqs)                              # num_seqs
    out, cache = kernels_pallas.ragged_paged_attention(*args, sm_scale=0.125, backend=backend, **BACKENDS[backend])
    np.testing.assert_array_equal(np.asarray(cache), np.asarray(b.kv_pages))
    assert not np.asarray(out).any()


def test_tpu_kernel_updates_the_cache_in_place(kv):
    b = batch(kv, jnp.float32, 16)
    closed = jax.make_jaxpr(lambda *a: tpu.ragged_paged_attention(*a, sm_scale=0.125))(*kv.args(b))
    calls = [e for e in closed.jaxpr.eqns if e.primitive.name == "pallas_call"]
    assert len(calls) == 1
    aliases = dict(calls[0].params["input_output_aliases"])
    assert list(aliases.values()) == [1]
    # The aliased operand is the cache argument itself (no copy in between), and output 1 is returned as the cache.
    assert calls[0].invars[next(iter(aliases))] is closed.jaxpr.invars[3]
    assert calls[0].outvars[1] is closed.jaxpr.outvars[1]
