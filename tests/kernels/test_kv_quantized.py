"""A quantized KV cache (codes with a float32 scale per token, head and K or V): the reference reads exactly the
numbers it stores, the TPU and GPU kernels (interpret mode) match the reference, and attention over it stays within the
error its codes allow."""
import numpy as np
import pytest
import jax.numpy as jnp

import kernels_pallas
from kernels_pallas.reference import CODE_MAX, quantize_rows
from test_attention import CASES, TOL, options, random_batch

CODES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
NAMES = ["p16-mha-d64-f32", "p32-gqa3-d64-bf16-window", "p16-gqa3-d64-f32-decode", "p16-gqa4-d80-bf16"]


def _quantized(b, code):
    """b's cache as (codes, scales), and b with every K/V (cache and this step's) replaced by what the codes stand
    for: a float cache holding exactly the quantized numbers."""
    codes, scales = quantize_rows(b.kv_pages, code)
    dequantized = lambda c, s: (c.astype(jnp.float32) * s[..., None]).astype(b.q.dtype)  # noqa: E731
    k_codes, k_scales = quantize_rows(b.k, code)
    v_codes, v_scales = quantize_rows(b.v, code)
    same = dict(vars(b), kv_pages=dequantized(codes, scales), k=dequantized(k_codes, k_scales),
                v=dequantized(v_codes, v_scales))
    return (codes, scales), type(b)(**same)


@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize("name", NAMES)
def test_reference_reads_exactly_what_the_codes_store(kv, code, name):
    b = random_batch(kv, name, seed=5)
    cache, stands_for = _quantized(b, CODES[code])
    args = list(kv.args(b))
    args[3] = cache
    out, (codes, scales) = kernels_pallas.ragged_paged_attention(*args, **options(name))
    assert codes.dtype == CODES[code] and scales.dtype == jnp.float32 and scales.shape == codes.shape[:3]
    want = kv.naive(stands_for, **options(name))  # float64 attention over the dequantized numbers
    tol = TOL[CASES[name][4]]
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=tol, rtol=tol)
    # this step's rows were written as the same codes (stands_for holds them rounded to the model's dtype)
    written = np.asarray(codes, np.float32) * np.asarray(scales)[..., None]
    exact = 1e-6 if CASES[name][4] == jnp.float32 else 2.0 ** -8
    np.testing.assert_allclose(written, kv.naive_cache(stands_for), atol=exact, rtol=exact)


# Attention over quantized K/V against the unquantized cache, relative to the output's RMS. A row's codes err by
# at most half a step (int8: amax / 254; fp8: 2^-4 of each value): for these N(0, 1) rows of 64-128 values
# (amax ~ 3), RMS errors of ~0.35% (int8) and ~2.2% (fp8) of an element. V's errors reach the output once, averaged
# by the softmax weights; K's move each score by ~sm_scale * |q| * |dk| (about the same relative size) and the
# weights with it, so the output moves by 2-2.5x the element error: measured 0.74-0.86% (int8), 3.2-3.7% (fp8).
# Bounds: twice the estimate.
BOUNDS = {"int8": 0.02, "fp8": 0.10}


@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize("name", NAMES)
def test_quantized_attention_within_bound(kv, code, name):
    b = random_batch(kv, name, seed=6)
    args = list(kv.args(b))
    exact = np.asarray(kernels_pallas.ragged_paged_attention(*args, **options(name))[0], np.float32)
    args[3] = _quantized(b, CODES[code])[0]
    out = np.asarray(kernels_pallas.ragged_paged_attention(*args, **options(name))[0], np.float32)
    error = np.sqrt(np.mean((out - exact) ** 2)) / np.sqrt(np.mean(exact ** 2))
    floor = 0.01 if CASES[name][4] == jnp.bfloat16 else 0  # bfloat16 outputs round by ~2^-9 on their own
    assert 0 < error < BOUNDS[code] + floor


@pytest.mark.parametrize("backend", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize("name", NAMES)
def test_kernels_read_the_quantized_cache_as_the_reference(kv, backend, code, name):
    """The TPU kernel decodes the codes from packed words with integer ops and writes this step's codes by DMA and
    its scales by a scatter; the GPU kernel applies the scales to scores and probabilities. Both (interpret mode)
    give the reference's output and cache; block_kv 32 makes several kv blocks per sequence."""
    b = random_batch(kv, name, seed=7)
    args = list(kv.args(b))
    args[3] = _quantized(b, CODES[code])[0]
    out, (codes, scales) = kernels_pallas.ragged_paged_attention(*args, **options(name), backend=backend,
                                                                 interpret=True, block_kv=32)
    want, (want_codes, want_scales) = kernels_pallas.ragged_paged_attention(*args, **options(name))
    tol = TOL[CASES[name][4]]
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)
    np.testing.assert_array_equal(np.asarray(codes, np.float32), np.asarray(want_codes, np.float32))
    np.testing.assert_array_equal(np.asarray(scales), np.asarray(want_scales))


def test_codes_halve_a_bfloat16_cache(kv):
    name = "p16-gqa4-d80-bf16"
    b = random_batch(kv, name)
    codes, scales = _quantized(b, jnp.int8)[0]
    assert (codes.nbytes + scales.nbytes) / b.kv_pages.nbytes == pytest.approx((80 + 4) / 160)
    assert CODE_MAX[np.dtype(jnp.int8)] == 127 and np.abs(np.asarray(codes, np.float32)).max() == 127
