"""Grouped matmul, as `jax.lax.ragged_dot` computes it: rows sorted by group, each times its group's matrix.

    x: [R, K] rows, group g's sizes[g] rows consecutive and the groups in order; w: [G, K, N]; sizes: [G] int32
    -> [R, N] in x's dtype: out[r] = x[r] @ w[group of r] accumulated in float32, rows past sum(sizes) zero.

Two implementations with that signature (a mixture of experts' rows routed to its experts is the use):
- `reference`: jax.lax.ragged_dot, which XLA:GPU and XLA:TPU lower to their own grouped kernels.
- `pallas_gpu`: a Pallas Triton kernel over the `tile_plan` below: one program per (step, block of N columns),
  a step being one tile of block_m sorted rows and one group that has rows in it. It loops over K in blocks,
  reading only that group's matrix, and stores only the rows of its group (a masked store), so a tile shared by two
  groups is written by two programs without a race and no partial sums are combined afterwards. The output starts
  as zeros (aliased), which leaves rows past sum(sizes) zero. Integer or fp8 codes may come as w; they are cast to
  x's dtype in the kernel (exact for int8 and fp8 in bfloat16), so a quantized w is read as stored.
The plan is shared with the CPU loop of jaxserve/models/moe.py, which walks the same steps with XLA ops.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TilePlan:
    """Steps over (tile of sorted rows, group with rows in it): at most tiles + groups - 1 of them, the valid ones
    first. group, tile, valid: [steps]; starts, ends: [G] each group's first row and one past its last."""
    group: jax.Array
    tile: jax.Array
    valid: jax.Array
    starts: jax.Array
    ends: jax.Array


def tile_plan(sizes, num_rows: int, tile: int) -> TilePlan:
    """The steps for `num_rows` rows in tiles of `tile`, grouped by sizes [G]. A group spanning several tiles has a
    step per tile; a tile holding several groups, a step per group. Invalid steps (past the last valid one) point
    at tile 0 and the last group."""
    groups = sizes.shape[0]
    num_tiles = -(-num_rows // tile)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    first = starts // tile
    count = jnp.where(sizes > 0, (ends - 1) // tile - first + 1, 0)  # tiles each group's rows touch
    done = jnp.cumsum(count)
    step = jnp.arange(num_tiles + groups - 1)
    group = jnp.minimum(jnp.searchsorted(done, step, side="right"), groups - 1)
    valid = step < done[-1]
    tile_of = jnp.where(valid, first[group] + step - (done[group] - count[group]), 0)
    return TilePlan(group.astype(jnp.int32), tile_of.astype(jnp.int32), valid, starts.astype(jnp.int32),
                    ends.astype(jnp.int32))


def reference(x, w, sizes):
    """jax.lax.ragged_dot in float32, cast to x's dtype (codes in w are cast to x's dtype first)."""
    return lax.ragged_dot(x, w.astype(x.dtype), sizes, preferred_element_type=jnp.float32).astype(x.dtype)


def _block(n: int, cap: int, what: str) -> int:
    """The largest power of two <= cap that divides n, at least 16 (tl.dot's smallest side)."""
    b = cap
    while n % b and b > 16:
        b //= 2
    if n % b:
        raise ValueError(f"the Pallas GPU grouped matmul needs {what} to be a multiple of 16, not {n}")
    return b


def default_block_m(rows: int, groups: int, smallest: int = 16) -> int:
    """A tile near the rows a group gets on average (so few steps hold one group's few rows), a power of two from
    `smallest` (tl.dot's 16 here) to 64."""
    return int(min(64, max(smallest, 1 << max(rows // groups - 1, 0).bit_length())))


def _kernel(group_ref, tile_ref, valid_ref, starts_ref, ends_ref, x_ref, w_ref, _, o_ref, *, block_m, block_n,
            block_k):
    # group/tile/valid_ref: [steps]; starts/ends_ref: [G]; x_ref: [tiles * block_m, K]; w_ref: [G, K, N];
    # o_ref: [tiles * block_m, N], zeros where no program stores (aliased to the unused input `_`).
    s, j = pl.program_id(0), pl.program_id(1)
    g = group_ref[s]
    first_row = tile_ref[s] * block_m
    rows = pl.ds(pl.multiple_of(first_row, block_m), block_m)
    cols = pl.ds(pl.multiple_of(j * block_n, block_n), block_n)

    def body(kb, acc):
        ks = pl.ds(pl.multiple_of(kb * block_k, block_k), block_k)
        return acc + plgpu.dot(x_ref[rows, ks], w_ref[g, ks, cols].astype(x_ref.dtype))

    num_k = jnp.where(valid_ref[s] != 0, x_ref.shape[1] // block_k, 0)
    acc = lax.fori_loop(0, num_k, body, jnp.zeros((block_m, block_n), jnp.float32))
    pos = first_row + jnp.arange(block_m)
    mine = (pos >= starts_ref[g]) & (pos < ends_ref[g]) & (valid_ref[s] != 0)
    plgpu.store(o_ref.at[rows, cols], acc.astype(o_ref.dtype),
                mask=jnp.broadcast_to(mine[:, None], (block_m, block_n)))


def pallas_gpu(x, w, sizes, *, block_m=None, block_n=None, block_k=None, num_warps=4, num_stages=3,
               interpret=False):
    """The grouped matmul as a Pallas Triton kernel (see the module docstring). K and N must be multiples of 16;
    block_n / block_k default to the largest power of two up to 128 / 64 that divides N / K."""
    r, k = x.shape
    groups, _, n = w.shape
    block_m = block_m or default_block_m(r, groups)
    block_n = block_n or _block(n, 128, "N")
    block_k = block_k or _block(k, 64, "K")
    plan = tile_plan(sizes, r, block_m)
    padded = -(-r // block_m) * block_m
    xp = jnp.pad(x, ((0, padded - r), (0, 0)))
    steps = plan.group.shape[0]
    whole = lambda *shape: pl.BlockSpec(shape, lambda s, j: (0,) * len(shape))  # noqa: E731
    out = pl.pallas_call(
        functools.partial(_kernel, block_m=block_m, block_n=block_n, block_k=block_k),
        out_shape=jax.ShapeDtypeStruct((padded, n), x.dtype),
        grid=(steps, n // block_n),
        in_specs=[whole(steps), whole(steps), whole(steps), whole(groups), whole(groups), whole(padded, k),
                  whole(groups, k, n), whole(padded, n)],
        out_specs=whole(padded, n),
        input_output_aliases={7: 0},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )(plan.group, plan.tile, plan.valid.astype(jnp.int32), plan.starts, plan.ends, xp, w,
      jnp.zeros((padded, n), x.dtype))
    return out[:r]
