"""Ragged paged attention (with its cache write): reference vs a naive numpy spec, Pallas kernels (interpret
mode) vs reference."""
import numpy as np
import pytest
import jax.numpy as jnp

import kernels_pallas

# (page_size, Hq, Hkv, D, dtype, sliding_window, soft_cap, decode_only): together they cover page
# sizes 16/32, GQA ratios 1/2/3/4/8 (incl. MQA), head dims 64/80/96/128, f32/bf16, window and soft cap.
CASES = {
    "p16-mha-d64-f32": (16, 4, 4, 64, jnp.float32, None, None, False),
    "p32-gqa3-d64-bf16-window": (32, 6, 2, 64, jnp.bfloat16, 40, None, False),
    "p16-gqa8-d128-f32-softcap": (16, 16, 2, 128, jnp.float32, None, 20.0, False),
    "p32-mqa8-d128-bf16-window-softcap": (32, 8, 1, 128, jnp.bfloat16, 64, 30.0, False),
    "p16-gqa3-d64-f32-decode": (16, 9, 3, 64, jnp.float32, None, None, True),
    "p16-gqa3-d128-bf16-decode-window": (16, 3, 1, 128, jnp.bfloat16, 50, None, True),
    "p16-gqa4-d80-bf16": (16, 8, 2, 80, jnp.bfloat16, None, None, False),   # heads Triton takes in pieces
    "p32-gqa2-d96-f32-decode": (32, 4, 2, 96, jnp.float32, None, None, True),
}
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}          # vs float64 numpy / vs the reference


def random_batch(kv, name, seed=0):
    """Mixed batch: decodes ending mid-page, one long prefill chunk, one context over many pages,
    plus padding tokens and padding sequences. decode_only: every sequence has q_len 1 (T == S)."""
    ps, hq, hkv, d, dtype, *_, decode_only = CASES[name]
    rng = np.random.default_rng([seed, len(name)])
    kv_lens = [int(rng.integers(1, 3 * ps)) for _ in range(3)] + [int(rng.integers(12 * ps, 20 * ps))]
    q_lens = [1] * 4
    if not decode_only:
        kv_lens.append(int(rng.integers(70, 4 * ps + 70)))
        q_lens.append(int(rng.integers(40, 70)))         # long chunk after some cached context
    tokens = sum(q_lens) + (0 if decode_only else 5)
    return kv.make_batch(rng, q_lens=q_lens, kv_lens=kv_lens, page_size=ps, hq=hq, hkv=hkv, d=d,
                         dtype=dtype, num_tokens=tokens, max_seqs=len(q_lens) + (1 if decode_only else 2),
                         pages_per_seq=24)


def options(name):
    ps, hq, hkv, d, dtype, window, cap, _ = CASES[name]
    return dict(sm_scale=d ** -0.5, sliding_window=window, soft_cap=cap)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("block_kv", [32, 128])
def test_reference_matches_naive(kv, name, block_kv):
    b = random_batch(kv, name)
    out, cache = kernels_pallas.ragged_paged_attention(*kv.args(b), **options(name), block_kv=block_kv)
    assert out.shape == b.q.shape and out.dtype == b.q.dtype
    want = kv.naive(b, **options(name))
    tol = TOL[CASES[name][4]]
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=tol, rtol=tol)
    assert cache.dtype == b.kv_pages.dtype
    np.testing.assert_array_equal(np.asarray(cache, np.float64), kv.naive_cache(b))


def test_reference_explicit_q_tile_and_padding_rows_zero(kv):
    name = "p16-gqa8-d128-f32-softcap"
    b = random_batch(kv, name, seed=3)
    outs = [kernels_pallas.ragged_paged_attention(*kv.args(b), **options(name), q_tile=qt)[0]
            for qt in (1, 4, 16)]
    for o in outs[1:]:
        np.testing.assert_allclose(np.asarray(o), np.asarray(outs[0]), atol=2e-5, rtol=2e-5)
    valid = int(b.cu_q_lens[int(b.num_seqs[0])])
    assert not np.asarray(outs[0][valid:]).any()


@pytest.mark.parametrize("backend", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("name", CASES)
def test_pallas_interpret_matches_reference(kv, backend, name):
    b = random_batch(kv, name, seed=1)
    # block_kv 64: several kv blocks per sequence, so the double-buffered / pipelined loop runs.
    out, cache = kernels_pallas.ragged_paged_attention(*kv.args(b), **options(name), backend=backend,
                                                       interpret=True, block_kv=64)
    want, want_cache = kernels_pallas.ragged_paged_attention(*kv.args(b), **options(name))
    assert out.shape == want.shape and out.dtype == want.dtype
    tol = TOL[CASES[name][4]]
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32),
                               atol=tol, rtol=tol)
    valid = int(b.cu_q_lens[int(b.num_seqs[0])])
    assert not np.asarray(out[valid:], np.float32).any()
    assert cache.dtype == want_cache.dtype
    np.testing.assert_array_equal(np.asarray(cache, np.float32), np.asarray(want_cache, np.float32))


@pytest.mark.parametrize("backend", ["reference", "pallas_tpu", "pallas_gpu"])
def test_stale_nan_past_a_sequence_never_reaches_the_output(kv, backend):
    """Every cache row no sequence owns (the tail of each last page, unused pages) is NaN, as a reused page
    may hold: the output is finite and equal to the clean cache's. The mixed batch has a prefill chunk of
    several query tiles, whose later tiles' rows the earlier tiles may read before they are written."""
    name = "p16-gqa8-d128-f32-softcap"
    b = random_batch(kv, name, seed=2)
    ps = CASES[name][0]
    owned = np.zeros(b.kv_pages.shape[:2], bool)                 # [pages, page_size]
    tables, lens = np.asarray(b.block_tables), np.asarray(b.kv_lens)
    for s in range(int(b.num_seqs[0])):
        for j in range(lens[s]):
            owned[tables[s, j // ps], j % ps] = True
    dirty = list(kv.args(b))
    dirty[3] = jnp.where(owned[:, :, None, None], b.kv_pages, jnp.nan).astype(b.kv_pages.dtype)
    tuning = {} if backend == "reference" else {"interpret": True, "block_kv": 32}
    out = np.asarray(kernels_pallas.ragged_paged_attention(*dirty, **options(name), backend=backend, **tuning)[0])
    clean = np.asarray(kernels_pallas.ragged_paged_attention(*kv.args(b), **options(name), backend=backend,
                                                             **tuning)[0])
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, clean)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])
def test_gpu_split_kv_decode_matches_reference(kv, num_splits):
    """Flash-decoding: each tile's kv range split over programs and merged after, for any split count (more
    splits than a tile has blocks leaves some empty)."""
    name = "p16-gqa3-d128-bf16-decode-window"
    b = random_batch(kv, name, seed=4)
    out, _ = kernels_pallas.ragged_paged_attention(*kv.args(b), **options(name), backend="pallas_gpu",
                                                   interpret=True, block_kv=32, num_splits=num_splits)
    want, _ = kernels_pallas.ragged_paged_attention(*kv.args(b), **options(name))
    tol = TOL[CASES[name][4]]
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)


def test_gpu_splits_fill_the_sms_only_when_programs_are_few():
    from kernels_pallas.gpu import num_kv_splits

    assert num_kv_splits(programs=8, max_blocks=64) == 16       # 1 sequence x 8 kv heads: 16 x 8 = 128 of 132
    assert num_kv_splits(programs=64, max_blocks=64) == 2       # 8 sequences
    assert num_kv_splits(programs=8, max_blocks=3) == 2         # never more than a tile's blocks (power of two)
    assert num_kv_splits(programs=2048, max_blocks=64) == 1     # 256 sequences fill the GPU alone
