"""Sampler statistics and logit processing against numpy references.

Frequency tests draw enough samples for 5-sigma bounds with fixed seeds, so they are not flaky.
"""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.core import sampler
from jaxserve.core.sampler import SamplerState, SamplingBatch, apply_masks, record_tokens, sample
from jaxserve.sampling_params import SamplingParams

DRAWS = 6000
LOGITS = np.log(np.array([0.30, 0.22, 0.15, 0.12, 0.09, 0.06, 0.04, 0.02], np.float32))
V = len(LOGITS)


def _batch(rows, **cols):
    """A SamplingBatch of `rows` rows: greedy, no processing, slot i for row i, unless `cols` says otherwise."""
    base = dict(slot=np.arange(rows, dtype=np.int32), temperature=np.zeros(rows, np.float32),
                top_k=np.zeros(rows, np.int32), top_p=np.ones(rows, np.float32), min_p=np.zeros(rows, np.float32),
                presence=np.zeros(rows, np.float32), frequency=np.zeros(rows, np.float32),
                repetition=np.ones(rows, np.float32), use_bias=np.zeros(rows, bool), block_stop=np.zeros(rows, bool),
                want_logprobs=np.zeros(rows, bool), seed=np.zeros((rows, 2), np.uint32),
                sample_index=np.zeros(rows, np.int32))
    for k, v in cols.items():
        base[k] = np.broadcast_to(np.asarray(v, base[k].dtype), base[k].shape).copy()
    return SamplingBatch(**base)


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
    sb = _batch(DRAWS, slot=0, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=[0, seed],
                sample_index=np.arange(DRAWS))
    tokens, _ = jax.jit(sample)(jnp.tile(jnp.asarray(LOGITS), (DRAWS, 1)), SamplerState.zeros(1, V), sb)
    return np.asarray(tokens)


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 0, 1.0, 0.0), (0.5, 0, 1.0, 0.0), (1.5, 0, 1.0, 0.0), (1.0, 3, 1.0, 0.0), (1.0, 0, 0.6, 0.0),
    (1.0, 5, 0.8, 0.0), (1.0, 0, 1.0, 0.3), (0.8, 4, 0.9, 0.1),
])
def test_frequencies_match_numpy_reference(temperature, top_k, top_p, min_p):
    expected = _expected(temperature, top_k, top_p, min_p)
    got = np.bincount(_draw(temperature, top_k, top_p, min_p), minlength=V) / DRAWS
    sigma = np.sqrt(expected * (1 - expected) / DRAWS)
    assert np.all(np.abs(got - expected) <= 5 * sigma + 1e-9)
    assert np.all(got[expected == 0] == 0)  # filtered tokens never appear


def test_stream_depends_only_on_seed_and_index():
    a, b, c = _draw(1.0, 0, 1.0, 0.0, seed=11), _draw(1.0, 0, 1.0, 0.0, seed=11), _draw(1.0, 0, 1.0, 0.0, seed=12)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def _state_with(counts=None, in_prompt=None, bias=None, stop_ids=None, rows=1):
    s = SamplerState.zeros(rows, V)
    put = lambda x, new, dtype: x if new is None else jnp.asarray(np.asarray(new, dtype).reshape(rows, V))  # noqa: E731
    return dataclasses.replace(s, counts=put(s.counts, counts, np.int32), in_prompt=put(s.in_prompt, in_prompt, bool),
                               bias=put(s.bias, bias, np.float32), stop_ids=put(s.stop_ids, stop_ids, bool))


def _greedy_logprobs(state, **cols):
    logits = jnp.asarray(LOGITS)[None]
    tokens, (chosen, rank, top_ids, top_lps) = sample(logits, state, _batch(1, want_logprobs=True, **cols))
    return int(tokens[0]), float(chosen[0]), int(rank[0])


def test_penalties_match_numpy():
    counts = np.array([3, 0, 1, 0, 0, 0, 0, 0])
    in_prompt = np.array([0, 1, 0, 0, 0, 0, 0, 0], bool)
    state = _state_with(counts=counts, in_prompt=in_prompt)
    for presence, frequency, repetition in [(1.5, 0, 1), (0, 0.4, 1), (0, 0, 1.8), (0.3, 0.2, 1.3)]:
        ref = LOGITS.copy()
        seen = (counts > 0) | in_prompt
        ref = np.where(seen, np.where(ref > 0, ref / repetition, ref * repetition), ref)
        ref = ref - frequency * counts - presence * (counts > 0)
        greedy, _ = sample(jnp.asarray(LOGITS)[None], state, _batch(1, presence=presence, frequency=frequency,
                                                                       repetition=repetition))
        assert int(greedy[0]) == int(np.argmax(ref))


def test_bias_min_tokens_and_logprobs():
    bias = np.zeros(V)
    bias[5] = 100.0  # logit_bias pushes token 5 to the top
    stop = np.zeros(V, bool)
    stop[0] = True
    state = _state_with(bias=bias, stop_ids=stop)
    assert _greedy_logprobs(state, use_bias=True)[0] == 5
    assert _greedy_logprobs(state, use_bias=False)[0] == 0  # the row only applies to requests that asked
    assert _greedy_logprobs(state, block_stop=True)[0] == 1  # EOS (0) masked before min_tokens
    token, lp, rank = _greedy_logprobs(state)
    ref = LOGITS - np.log(np.exp(LOGITS).sum())  # logprobs come from the raw logits
    assert token == 0 and rank == 1 and abs(lp - ref[0]) < 1e-5
    token, lp, rank = _greedy_logprobs(state, use_bias=True)
    assert token == 5 and rank == 6 and abs(lp - ref[5]) < 1e-5


def test_grammar_mask_applies_to_constrained_rows_only():
    masks = np.zeros((2, 1), np.int32)
    masks[:, 0] = (1 << 3) | (1 << 6)  # tokens 3 and 6 allowed
    rows = np.array([1, 3], np.int32)  # row 1 is constrained; the second mask row is padding (row 3 of 3: dropped)
    raw = jnp.tile(jnp.asarray(LOGITS), (3, 1))
    logits = apply_masks(raw, rows, masks)
    tokens, (chosen, *_) = sample(logits, SamplerState.zeros(3, V), _batch(3, want_logprobs=True), raw)
    assert np.asarray(tokens).tolist() == [0, 3, 0]  # the best allowed token; unconstrained rows are untouched
    ref = LOGITS - np.log(np.exp(LOGITS).sum())
    assert np.allclose(np.asarray(chosen), ref[[0, 3, 0]], atol=1e-5)  # logprobs from the logits before the mask


@pytest.mark.parametrize("temperature", [1.0, 1e-9])
def test_a_vanishing_top_p_keeps_the_most_likely_token(temperature):
    # Found by fuzzing: top_p=5e-324 is 0 in float32 and emptied the row, so the draw returned id 0.
    logits = jnp.tile(jnp.asarray(LOGITS[::-1].copy()), (4, 1))  # the most likely token is the last one
    sb = _batch(4, temperature=temperature, top_p=5e-324, seed=[0, 3], sample_index=np.arange(4))
    tokens, _ = jax.jit(sample)(logits, SamplerState.zeros(4, V), sb)
    assert np.asarray(tokens).tolist() == [V - 1] * 4


def test_record_tokens_counts_output_tokens_only():
    state = SamplerState.zeros(2, V)
    num_prompt = sampler.INT_PARAMS.index("num_prompt")
    state = dataclasses.replace(state, ints=state.ints.at[:, num_prompt].set(jnp.array([1, 3])))
    # Slot 0: position 0 is its prompt, 1 its output; slot 1: position 5 is output; slot 2 is padding (dropped).
    state = record_tokens(state, jnp.array([4, 4, 6, 7]), jnp.array([0, 0, 1, 2]), jnp.array([0, 1, 5, 0]))
    counts = np.asarray(state.counts)
    assert counts[0, 4] == 1 and counts[1, 6] == 1 and counts.sum() == 2


def test_stale_rows_of_a_reused_slot_leave_a_plain_request_alone():
    """admit writes no [V] rows: a slot keeps its last request's counts, prompt set, bias and stop ids, which a
    request without penalties, bias or min_tokens (no dense rows) must not feel, in a batch where another row
    does use them."""
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.normal(0, 2, (2, V)).astype(np.float32))
    stale = _state_with(counts=rng.integers(0, 9, (2, V)), in_prompt=rng.random((2, V)) < 0.5,
                        bias=rng.normal(0, 5, (2, V)), stop_ids=rng.random((2, V)) < 0.5, rows=2)
    plain = SamplingParams(temperature=0.0)
    assert not sampler.needs_dense_rows(types.SimpleNamespace(params=plain, num_computed_tokens=0,
                                                              num_prompt_tokens=1))
    # Row 1 uses penalties, so the batch takes the adjusting branch; row 0 is the plain request.
    sb = _batch(2, presence=[0.0, 0.7], frequency=[0.0, 0.3], repetition=[1.0, 1.4])
    got, _ = sample(logits, stale, sb)
    want, _ = sample(logits, SamplerState.zeros(2, V), sb)
    assert int(got[0]) == int(want[0]) == int(np.argmax(np.asarray(logits)[0]))


def test_admitted_parameters_come_back_per_row():
    """admit writes a fresh row's parameters into its slot; rows_of reads them back (seed words with the high bit
    set included); finish_rows counts the sample and keeps the token; padding rows read as neutral and greedy."""
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, presence_penalty=0.5,
                            frequency_penalty=-0.25, repetition_penalty=1.2, min_tokens=3, logprobs=2,
                            logit_bias={1: 2.0})
    seed = (0xDEADBEEF << 32) | 0x9ABCDEF0
    floats, ints = sampler.slot_params(params, seed)
    state = SamplerState.zeros(4, V)
    state = sampler.admit(state, jnp.array([2, 4]), jnp.asarray([floats, floats], jnp.float32),
                          jnp.asarray([(*ints, 1, 7)] * 2, jnp.int32))
    assert sampler.needs_dense_rows(types.SimpleNamespace(params=params, num_computed_tokens=0,
                                                          num_prompt_tokens=1))
    sb = sampler.rows_of(state, jnp.array([2, 0]), jnp.array([True, False]))
    got = {f.name: np.asarray(getattr(sb, f.name)) for f in dataclasses.fields(sb)}
    assert np.allclose(got["temperature"], [0.7, 0]) and np.allclose(got["top_p"], [0.9, 1])
    assert got["top_k"].tolist() == [40, 0] and np.allclose(got["min_p"], [0.05, 0])
    assert np.allclose(got["presence"], [0.5, 0]) and np.allclose(got["frequency"], [-0.25, 0])
    assert np.allclose(got["repetition"], [1.2, 1]) and got["use_bias"].tolist() == [True, False]
    assert got["want_logprobs"].tolist() == [True, False] and got["block_stop"].tolist() == [True, False]
    assert got["seed"].tolist()[0] == [0xDEADBEEF, 0x9ABCDEF0] and got["sample_index"].tolist() == [1, 0]
    state = sampler.finish_rows(state, jnp.array([2, 4]), jnp.array([True, True]), jnp.array([9, 8]))
    assert int(state.last_token[2]) == 9 and int(sampler.rows_of(state, jnp.array([2])).sample_index[0]) == 2


def _reference_cutoff(x, top_k, top_p, min_p=0.0):
    """The exact definitions, in float64 numpy: min-p survivors (p >= min_p * p_max); every survivor at or above
    the k-th largest; then, by decreasing logit, the smallest prefix of those holding top_p of their mass, with
    the ties of its last."""
    x = x.astype(np.float64)
    alive = (x >= x.max() + np.log(min_p) if min_p else np.ones(len(x), bool)) & np.isfinite(x)
    ordered = np.sort(x[alive])[::-1]
    kth = ordered[top_k - 1] if 0 < top_k <= len(ordered) else -np.inf
    in_k = alive & (x >= kth)
    p = np.where(in_k, np.exp(x - x.max()), 0)
    p /= p.sum()
    order = np.argsort(-x, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    kept = order[(before < top_p) & in_k[order]]
    kept = np.union1d(kept, order[:1])
    return in_k & (x >= x[kept].min())


@pytest.mark.parametrize("vocab", [50, 300, 4096, 32000])
def test_truncation_equals_the_exact_definitions(vocab):
    """Random rows, with ties (logits on a coarse grid), peaked and flat, with and without min-p, across the
    candidate width and past it, and rows where a mask leaves few tokens; a row said to lie within its candidates
    keeps only candidate tokens."""

    rng = np.random.default_rng(vocab)
    rows, settings = [], []
    for i in range(60):
        scale = [0.05, 1.0, 4.0][i % 3]  # flat rows need the exact search; peaked ones stay in the candidates
        x = rng.normal(0, scale, vocab)
        if i % 2:
            x = np.round(x * 4) / 4  # many ties
        if i % 5 == 4:  # a grammar's mask: a few tokens (or a few hundred) left
            x[rng.random(vocab) > [0.002, 0.02][i % 2]] = -np.inf
            x[rng.integers(vocab)] = 1.0
        top_k = int(rng.choice([0, 1, 5, sampler.CANDIDATES, sampler.CANDIDATES + 7, vocab, vocab + 3]))
        top_p = float(rng.choice([1.0, 0.9, 0.5, 0.05, 1e-30]))
        min_p = float(rng.choice([0.0, 0.0, 0.01, 0.3]))
        temperature = float(rng.choice([0.5, 1.0, 2.0]))  # powers of two: scaling keeps every tie exactly
        rows.append(x)
        settings.append((temperature, top_k, top_p, min_p))
    logits = np.asarray(rows, np.float32)
    cols = [jnp.asarray(np.array(c, dtype))
            for c, dtype in zip(zip(*settings), (np.float32, np.int32, np.float32, np.float32))]
    cut, inside, _, ids = (np.asarray(a) for a in jax.jit(sampler._truncation)(jnp.asarray(logits), *cols))
    for row, (t, k, p, m), c, within, candidates in zip(logits, settings, cut, inside, ids):
        row = row / np.float32(t)
        expected = _reference_cutoff(row, k, p, m)
        assert np.array_equal((row >= c) & np.isfinite(row), expected), (k, p, m)  # -inf: never drawn
        if within:
            assert set(np.flatnonzero(expected)) <= set(candidates.tolist())


def test_grouped_argmax_takes_the_first_maximum():

    rng = np.random.default_rng(1)
    x = np.round(rng.normal(size=(64, 1000)), 1).astype(np.float32)  # ties for the maximum are common
    x[3, :] = -np.inf
    def argmax(x):
        maxima, best = sampler._group_maxima(x)
        return sampler._argmax(x, maxima, best), best

    index, best = jax.jit(argmax)(jnp.asarray(x))
    assert np.array_equal(np.asarray(index), np.argmax(x, -1)) and np.array_equal(np.asarray(best), x.max(-1))


@pytest.mark.parametrize("top_k", [0, 5])  # drawn over the whole row / among the candidates
def test_draws_across_groups_match_the_distribution(top_k):
    """Mass spread over several groups and block edges, masked tokens between: frequencies match, and a masked
    token never comes out."""
    vocab, draws = 700, 6000
    logits = np.full(vocab, -np.inf, np.float32)
    heavy = [0, 255, 256, 511, 600, 699]
    logits[heavy] = np.log([0.25, 0.2, 0.15, 0.2, 0.1, 0.1])
    sb = _batch(draws, slot=0, temperature=1.0, top_k=top_k, seed=[0, 3], sample_index=np.arange(draws))
    tokens, _ = jax.jit(sample)(jnp.tile(jnp.asarray(logits), (draws, 1)), SamplerState.zeros(1, vocab), sb)
    got = np.bincount(np.asarray(tokens), minlength=vocab) / draws
    expected = np.where(np.isfinite(logits), np.exp(logits), 0)
    assert set(np.flatnonzero(got)) <= set(heavy)
    sigma = np.sqrt(expected * (1 - expected) / draws)
    assert np.all(np.abs(got - expected) <= 5 * sigma + 1e-9)
