"""The largest values of each row and their indices, given the row's group maxima: the candidates that top-k and
top-p sampling decide from (jaxserve/core/sampler.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def grouped(x, group: int, fill=-jnp.inf):
    """x [S, V] -> [S, ceil(V / group), group], padded with `fill`."""
    s, v = x.shape
    return jnp.pad(x, ((0, 0), (0, -v % group)), constant_values=fill).reshape(s, -1, group)


def top_candidates(x, maxima, width: int, group: int):
    """x [S, V] float32, maxima [S, ceil(V / group)] (the maxima of x's groups of `group` consecutive values) ->
    the `width` (<= V) largest values of each row, descending, and their indices ([S, width] float32, int32), ties
    in ascending index order as lax.top_k. The C++ kernel (top_candidates.cc); XLA:CPU only."""
    s = x.shape[0]
    out = (jax.ShapeDtypeStruct((s, width), jnp.float32), jax.ShapeDtypeStruct((s, width), jnp.int32))
    return jax.ffi.ffi_call("jaxserve_top_candidates", out)(x.astype(jnp.float32), maxima.astype(jnp.float32),
                                                             group=np.int64(group))


def top_candidates_reference(x, maxima, width: int, group: int):
    """top_candidates in XLA ops: the same values; where values tie, their indices may come in another order (and
    at the edge be other indices of the tied value); those of -inf values are unspecified. Each of the
    `width` largest values lies in one of the `width` groups with the largest maxima, so two short top_k calls
    replace one over the row. Values of those groups below the smallest of their maxima cannot count and are set
    to -inf first: top_k keeps a heap, which they then never enter (about 1.5x faster on CPU)."""
    groups = grouped(x, group)
    s, num_groups, _ = groups.shape
    picked = min(width, num_groups)
    group_max, group_ids = jax.lax.top_k(maxima, picked)
    # Without the barriers XLA's simplifier can turn a top_k whose values are compared back against the row into
    # a sort of the whole row: 30-60x slower on CPU. (Only values go through one: XLA's top_k decomposition, used
    # on sharded inputs, cannot take a barrier over both outputs.)
    group_max = jax.lax.optimization_barrier(group_max)
    values = jnp.take_along_axis(groups, group_ids[:, :, None], 1).reshape(s, picked * group)
    if picked == width:  # then `width` values are >= the smallest listed maximum: none below it can count
        values = jnp.where(values < group_max[:, -1:], -jnp.inf, values)
    ids = (group_ids[:, :, None] * group + jnp.arange(group)).reshape(s, -1)
    top, at = jax.lax.top_k(values, width)
    return jax.lax.optimization_barrier(top), jnp.take_along_axis(ids, at, -1).astype(jnp.int32)
