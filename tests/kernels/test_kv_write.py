"""write_kv: every backend agrees, padding slots are skipped, and the Pallas outputs alias the cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_pallas
from kernels_pallas import gpu, tpu

PALLAS = {"pallas_tpu": tpu, "pallas_gpu": gpu}


def random_write(dtype, *, page_size, hkv=3, d=64, num_pages=12, tokens=40, seed=0):
    """A prefill run of consecutive slots, scattered decode slots and padding (-1) tokens."""
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
    free = rng.permutation(np.arange(page_size * 3, num_pages * page_size))
    slots = np.concatenate([np.arange(5, 5 + tokens // 2), free[:tokens - tokens // 2]])
    slots[rng.choice(tokens, 6, replace=False)] = -1
    return (f(hkv, num_pages, page_size, d), f(hkv, num_pages, page_size, d), f(tokens, hkv, d),
            f(tokens, hkv, d), jnp.asarray(rng.permutation(slots), jnp.int32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("page_size", [16, 32])
def test_reference_writes_valid_slots_only(dtype, page_size):
    k, v, kn, vn, slots = random_write(dtype, page_size=page_size)
    k2, v2 = kernels_pallas.write_kv(k, v, kn, vn, slots)
    flat = lambda x: np.asarray(x, np.float32).reshape(x.shape[0], -1, x.shape[-1])
    s = np.asarray(slots)
    for new, old, upd in ((kn, k, k2), (vn, v, v2)):
        got, before = flat(upd), flat(old)
        np.testing.assert_array_equal(got[:, s[s >= 0]], np.asarray(new, np.float32)[s >= 0].transpose(1, 0, 2))
        untouched = np.setdiff1d(np.arange(got.shape[1]), s[s >= 0])
        np.testing.assert_array_equal(got[:, untouched], before[:, untouched])


@pytest.mark.parametrize("backend", list(PALLAS))
@pytest.mark.parametrize("dtype,page_size", [(jnp.float32, 16), (jnp.bfloat16, 32), (jnp.bfloat16, 16)])
def test_pallas_matches_reference(backend, dtype, page_size):
    args = random_write(dtype, page_size=page_size, seed=1)
    want = kernels_pallas.write_kv(*args)
    got = kernels_pallas.write_kv(*args, backend=backend, interpret=True)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def test_all_padding_changes_nothing():
    k, v, kn, vn, slots = random_write(jnp.float32, page_size=16)
    slots = jnp.full_like(slots, -1)
    for backend in ["reference", *PALLAS]:
        tuning = {} if backend == "reference" else {"interpret": True}
        k2, v2 = kernels_pallas.write_kv(k, v, kn, vn, slots, backend=backend, **tuning)
        np.testing.assert_array_equal(np.asarray(k2), np.asarray(k))
        np.testing.assert_array_equal(np.asarray(v2), np.asarray(v))


@pytest.mark.parametrize("backend", list(PALLAS))
def test_pallas_output_aliases_cache(backend):
    k, v, kn, vn, slots = random_write(jnp.float32, page_size=16)
    closed = jax.make_jaxpr(lambda *a: PALLAS[backend].write_kv(*a))(k, v, kn, vn, slots)
    calls = [e for e in closed.jaxpr.eqns if e.primitive.name == "pallas_call"]
    assert len(calls) == 1
    aliases = dict(calls[0].params["input_output_aliases"])
    assert sorted(aliases.values()) == [0, 1]
    inputs = {i: calls[0].invars[i] for i in aliases}
    # The aliased operands are the caches themselves (no copy in between) and the outputs are returned.
    assert [inputs[i] for i in sorted(aliases, key=aliases.get)] == closed.jaxpr.invars[:2]
    assert list(calls[0].outvars) == list(closed.jaxpr.outvars)
