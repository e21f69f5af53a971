"""Sampler statistics against numpy references (enough draws for 5-sigma bounds, fixed seeds: not flaky)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.sampler import SamplingBatch, sample

DRAWS = 6000
LOGITS = np.log(np.array([0.30, 0.22, 0.15, 0.12, 0.09, 0.06, 0.04, 0.02], np.float32))


def _expected(temperature, top_k, top_p, min_p):
    p = np.exp(LOGITS / temperature)
    p /= p.sum()
    p = np.where(p >= min_p * p.max(), p, 0)
    order = np.argsort(-p)
    if top_k:
        p[order[top_k:]] = 0
    q = p / p.sum()
    before = np.cumsum(q[order]) - q[order]
    p[order[before >= top_p]] = 0
    return p / p.sum()


def _draw(temperature, top_k, top_p, min_p, seed=7):
    sp = SamplingBatch(
        temperature=jnp.full(DRAWS, temperature, jnp.float32), top_k=jnp.full(DRAWS, top_k, jnp.int32),
        top_p=jnp.full(DRAWS, top_p, jnp.float32), min_p=jnp.full(DRAWS, min_p, jnp.float32),
        seed=jnp.tile(jnp.array([[0, seed]], jnp.uint32), (DRAWS, 1)), sample_index=jnp.arange(DRAWS, dtype=jnp.int32))
    tokens = jax.jit(sample)(jnp.tile(jnp.asarray(LOGITS), (DRAWS, 1)), sp)
    return np.bincount(np.asarray(tokens), minlength=len(LOGITS)) / DRAWS


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 0, 1.0, 0.0), (0.5, 0, 1.0, 0.0), (1.5, 0, 1.0, 0.0), (1.0, 3, 1.0, 0.0), (1.0, 0, 0.6, 0.0),
    (1.0, 5, 0.8, 0.0), (1.0, 0, 1.0, 0.3), (0.8, 4, 0.9, 0.1),
])
def test_frequencies_match_numpy_reference(temperature, top_k, top_p, min_p):
    expected = _expected(temperature, top_k, top_p, min_p)
    got = _draw(temperature, top_k, top_p, min_p)
    sigma = np.sqrt(expected * (1 - expected) / DRAWS)
    assert np.all(np.abs(got - expected) <= 5 * sigma + 1e-9)
    assert np.all(got[expected == 0] == 0)  # filtered tokens never appear


def test_greedy_rows_take_the_argmax_in_a_mixed_batch():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32))
    sp = SamplingBatch(temperature=jnp.array([0, 1, 0, 1], jnp.float32), top_k=jnp.zeros(4, jnp.int32),
                       top_p=jnp.ones(4, jnp.float32), min_p=jnp.zeros(4, jnp.float32),
                       seed=jnp.zeros((4, 2), jnp.uint32), sample_index=jnp.zeros(4, jnp.int32))
    out = np.asarray(sample(logits, sp))
    assert out[0] == int(logits[0].argmax()) and out[2] == int(logits[2].argmax())


def test_stream_depends_only_on_seed_and_index():
    a = _draw(1.0, 0, 1.0, 0.0, seed=11)
    b = _draw(1.0, 0, 1.0, 0.0, seed=11)
    c = _draw(1.0, 0, 1.0, 0.0, seed=12)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
