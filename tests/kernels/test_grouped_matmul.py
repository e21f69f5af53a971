"""The grouped matmul (kernels_pallas/grouped_matmul.py): its tile plan covers every row once, the reference equals a
per-row numpy loop, and the Pallas GPU kernel (interpret mode) equals the reference, for loads from even to all
rows in one group, empty groups, rows past the groups' total, and int8 / fp8 codes as the matrices."""
import numpy as np
import pytest
import jax.numpy as jnp

from kernels_pallas import grouped_matmul

# (rows, K, N, sizes): the sizes sum to at most rows
LOADS = {
    "even-decode": (8, 32, 48, [1] * 8),
    "uneven-with-empty": (40, 64, 32, [10, 0, 25, 3]),
    "one-group-takes-all": (100, 48, 64, [0, 99, 1]),
    "tile-shared-by-many": (16, 32, 32, [2, 3, 1, 4, 2, 4]),
}


def _case(name, dtype, seed=0):
    r, k, n, sizes = LOADS[name]
    rng = np.random.default_rng([seed, len(name)])
    x = jnp.asarray(rng.standard_normal((r, k)), dtype)
    w = jnp.asarray(rng.standard_normal((len(sizes), k, n)), dtype)
    return x, w, jnp.asarray(sizes, jnp.int32)


def _per_row(x, w, sizes):
    """out[r] = x[r] @ w[group of r] in float64, rows past the groups' total zero."""
    x, w = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (x, w))
    out = np.zeros((x.shape[0], w.shape[2]))
    group = np.repeat(np.arange(len(sizes)), np.asarray(sizes))
    for row, g in enumerate(group):
        out[row] = x[row] @ w[g]
    return out


@pytest.mark.parametrize("tile", [8, 16, 64])
@pytest.mark.parametrize("name", LOADS)
def test_tile_plan_covers_each_row_once_with_its_group(name, tile):
    r, _, _, sizes = LOADS[name]
    plan = grouped_matmul.tile_plan(jnp.asarray(sizes, jnp.int32), r, tile)
    group = np.repeat(np.arange(len(sizes)), sizes)
    seen = np.zeros(r, int)
    valid = np.asarray(plan.valid)
    assert valid.tolist() == sorted(valid.tolist(), reverse=True)  # the valid steps first
    for g, t in zip(np.asarray(plan.group)[valid], np.asarray(plan.tile)[valid]):
        rows = np.arange(t * tile, min((t + 1) * tile, r))
        mine = rows[(rows >= plan.starts[g]) & (rows < plan.ends[g])]
        assert len(mine) > 0 and (group[mine] == g).all()  # no empty step, each row under its own group
        seen[mine] += 1
    assert seen.tolist() == [1] * len(group) + [0] * (r - len(group))


@pytest.mark.parametrize("name", LOADS)
def test_reference_is_the_per_row_product(name):
    x, w, sizes = _case(name, jnp.float32)
    np.testing.assert_allclose(np.asarray(grouped_matmul.reference(x, w, sizes)), _per_row(x, w, sizes), atol=1e-4)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize("name", LOADS)
def test_pallas_gpu_kernel_equals_the_reference(name, dtype, tol):
    x, w, sizes = _case(name, dtype)
    want = np.asarray(grouped_matmul.reference(x, w, sizes), np.float32)
    for block_m in (None, 16):
        got = grouped_matmul.pallas_gpu(x, w, sizes, block_m=block_m, interpret=True)
        assert got.shape == want.shape and got.dtype == x.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=tol * np.abs(want).max(), rtol=tol)
        assert not np.asarray(got[int(sizes.sum()):], np.float32).any()  # rows past the groups' total: zero


@pytest.mark.parametrize("code", [jnp.int8, jnp.float8_e4m3fn])
def test_pallas_gpu_kernel_reads_codes_as_stored(code):
    """Codes as w are cast to x's dtype in the kernel: the same as the reference over the cast matrices."""
    x, w, sizes = _case("uneven-with-empty", jnp.bfloat16)
    codes = jnp.clip(jnp.round(w.astype(jnp.float32) * 40), -127, 127).astype(code)
    want = np.asarray(grouped_matmul.reference(x, codes, sizes), np.float32)
    got = np.asarray(grouped_matmul.pallas_gpu(x, codes, sizes, interpret=True), np.float32)
    np.testing.assert_allclose(got, want, atol=3e-2 * np.abs(want).max(), rtol=3e-2)


def test_pallas_gpu_kernel_refuses_sides_triton_cannot_tile():
    x, w, sizes = _case("even-decode", jnp.float32)
    with pytest.raises(ValueError, match="N to be a multiple of 16, not 40"):
        grouped_matmul.pallas_gpu(x, w[:, :, :40], sizes, interpret=True)
