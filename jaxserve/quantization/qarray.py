"""A quantized array as a pytree, and the matmul and row lookup the models use on it.

One representation covers every scheme: integer (or fp8) values, a scale per group of `group` consecutive
elements along one axis (the contraction axis), an optional offset per group, and a constant zero point:

    w = scale * (values - zero) + offset

int8 per channel is one group spanning the axis; int4 is groups of 32-256 with two values packed per byte; fp8 is
float8_e4m3fn values with a per-channel scale; GGUF's Q4_1 is groups of 32 with float16 scale and offset, and so on
(gguf_blocks.py). Leaves may be numpy arrays (on the host while loading), jax arrays, or ShapeDtypeStructs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import kernels_cpu


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QArray:
    # int8, float8_e4m3fn, or (bits 4) uint8 holding two values along `axis`: element 2i in the low nibble, 2i + 1
    # in the high one. [.., n, ..] (n // 2 along `axis` when packed)
    values: jax.Array
    scale: jax.Array  # [.., n // group, ..]: values' shape with `axis` counted in groups; float16/32
    offset: jax.Array | None  # like scale, or None
    bits: int = dataclasses.field(default=8, metadata=dict(static=True))
    zero: int = dataclasses.field(default=0, metadata=dict(static=True))
    axis: int = dataclasses.field(default=0, metadata=dict(static=True))  # the grouped (contraction) axis

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (dequantized) shape."""
        shape = list(self.values.shape)
        shape[self.axis] *= 8 // self.bits
        return tuple(shape)

    @property
    def ndim(self) -> int:
        return len(self.values.shape)

    @property
    def group(self) -> int:
        return self.shape[self.axis] // self.scale.shape[self.axis]

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(x) for x in (self.values, self.scale, self.offset) if x is not None)

    @property
    def T(self) -> QArray:  # noqa: N802 (numpy's name)
        """A 2-D QArray transposed (the grouped axis moves with it)."""
        assert self.ndim == 2
        return dataclasses.replace(self, values=self.values.T, scale=self.scale.T,
                                   offset=None if self.offset is None else self.offset.T, axis=1 - self.axis)


def _nbytes(x) -> int:
    return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize


def is_quantized(x) -> bool:
    return isinstance(x, QArray)


def unpack_int4(packed, axis: int):
    """uint8 [.., n // 2, ..] -> uint8 [.., n, ..] along `axis` (low nibble first)."""
    xp = np if isinstance(packed, np.ndarray) else jnp
    pairs = xp.stack([packed & 15, packed >> 4], axis=axis + 1)
    shape = list(packed.shape)
    shape[axis] *= 2
    return pairs.reshape(shape)


def pack_int4(values: np.ndarray, axis: int) -> np.ndarray:
    """uint8 values in [0, 16), [.., n, ..] with n even -> [.., n // 2, ..] along `axis` (numpy, at load)."""
    values = np.moveaxis(values.astype(np.uint8), axis, 0)
    packed = values[0::2] | (values[1::2] << 4)
    return np.moveaxis(packed, 0, axis)


def grouped(x, axis: int, group: int):
    """[.., n, ..] -> [.., n // group, group, ..]: each group of `group` consecutive elements along axis."""
    return x.reshape(x.shape[:axis] + (x.shape[axis] // group, group) + x.shape[axis + 1:])


def _scaled(codes, w: QArray, dtype, group: int):
    """codes [.., n, ..] along w.axis (w's codes unpacked, or one nibble of each packed pair), `group` consecutive
    ones to a scale -> scale * (codes - zero) + offset, computed in dtype."""
    xp = np if isinstance(codes, np.ndarray) else jnp
    v = grouped(codes.astype(dtype), w.axis, group)
    if w.zero:
        v = v - np.asarray(w.zero, dtype)
    v = v * xp.expand_dims(w.scale.astype(dtype), w.axis + 1)
    if w.offset is not None:
        v = v + xp.expand_dims(w.offset.astype(dtype), w.axis + 1)
    return v.reshape(codes.shape)


def dequantize(w: QArray, dtype=jnp.float32):
    """The float array w stands for, computed in float32 (so a GGUF block dequantizes exactly as the gguf package
    does) and cast to dtype."""
    q = unpack_int4(w.values, w.axis) if w.bits == 4 else w.values
    return _scaled(q, w, np.float32, w.group).astype(dtype)


def linear(x, w, out_dtype=None):
    """x [..., in] @ w [in, out] for a float or quantized w (the one matmul of every model family).

    A quantized w is dequantized inside the program in x's dtype, as the dot's operand, which XLA fuses into the
    dot on TPU and GPU. With one scale per output column (int8, fp8 per channel) the scale is applied to the dot's
    output instead. 4-bit codes are not interleaved back into rows: the even rows (low nibbles) and odd rows (high
    nibbles) are two dots against x's even and odd columns, each operand an elementwise function of the packed
    array, which XLA:TPU keeps in the dot's fusion (bench/tpu_quantized_linear.py). XLA:CPU does not fuse that
    conversion (it writes the float weights out every step), so there 4-bit codes grouped by multiples of 32 go to
    the C++ kernel (kernels_cpu/quantized_linear.cc, int16 activations) where it is built."""
    out_dtype = out_dtype or x.dtype
    if not isinstance(w, QArray):
        return jnp.dot(x, w, preferred_element_type=out_dtype).astype(out_dtype)
    assert w.axis == 0, "a linear weight is grouped along its input axis"
    if _packed4_kernel_takes(w):
        return _cpu_kernel_or(lambda x: kernels_cpu.packed4_columns(x, w.values, w.scale, w.offset, w.zero), x,
                              out_dtype, lambda x: _linear_xla(x, w, out_dtype))
    return _linear_xla(x, w, out_dtype)


def _cpu_kernel_or(kernel, x, out_dtype, default):
    """kernel(x as [T, in]) -> [T, out] float32 on XLA:CPU, default(x) on other platforms (chosen when lowered)."""
    def on_cpu(x):
        return kernel(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1).astype(out_dtype)
    return jax.lax.platform_dependent(x, cpu=on_cpu, default=default)


def _cpu_kernel_takes(w: QArray, target: str, in_axis: int) -> bool:
    """Whether the XLA:CPU kernel `target` is registered and takes the 2-D w grouped along in_axis: groups of a
    multiple of 32, float16/32 scales (and offsets like them)."""
    return (kernels_cpu.enabled(target) and w.ndim == 2 and w.axis == in_axis
            and w.group % kernels_cpu.quantized_linear.BLOCK == 0 and w.scale.dtype in (jnp.float16, jnp.float32)
            and (w.offset is None or w.offset.dtype == w.scale.dtype))


def _packed4_kernel_takes(w: QArray) -> bool:
    """4-bit codes [in / 2, out], outputs in whole tiles of 32."""
    return w.bits == 4 and w.shape[1] % 32 == 0 and _cpu_kernel_takes(w, kernels_cpu.quantized_linear.PACKED4, 0)


def _int8_rows_kernel_takes(rows: QArray) -> bool:
    """int8 codes [out, in] without offset or zero point."""
    return (rows.values.dtype == jnp.int8 and rows.offset is None and rows.zero == 0
            and _cpu_kernel_takes(rows, kernels_cpu.quantized_linear.INT8_ROWS, 1))


def _linear_xla(x, w: QArray, out_dtype):
    if w.group == w.shape[0] and w.offset is None and w.zero == 0 and w.bits == 8:
        y = jnp.dot(x, w.values.astype(x.dtype), preferred_element_type=jnp.float32)
        return (y * w.scale.astype(jnp.float32)).astype(out_dtype)
    if w.bits == 4:
        y = (jnp.dot(x[..., 0::2], _scaled(w.values & 15, w, x.dtype, w.group // 2), preferred_element_type=jnp.float32)
             + jnp.dot(x[..., 1::2], _scaled(w.values >> 4, w, x.dtype, w.group // 2),
                       preferred_element_type=jnp.float32))
    else:
        y = jnp.dot(x, _scaled(w.values, w, x.dtype, w.group), preferred_element_type=jnp.float32)
    return y.astype(out_dtype)


def linear_rows(x, rows, out_dtype=None):
    """x [..., in] @ rows [out, in].T: x against each row of a table, as a tied LM head against the embeddings
    (a QArray table grouped along its second axis). int8 codes go to the XLA:CPU kernel where it is built; the
    rest is linear() on the transposed table."""
    if isinstance(rows, QArray) and _int8_rows_kernel_takes(rows):
        return _cpu_kernel_or(lambda x: kernels_cpu.int8_rows(x, rows.values, rows.scale), x, out_dtype or x.dtype,
                              lambda x: linear(x, rows.T, out_dtype))
    return linear(x, rows.T, out_dtype)


def take_rows(w, ids, dtype):
    """w [rows, n][ids] as dtype: an embedding lookup that dequantizes only the rows it gathers."""
    if not isinstance(w, QArray):
        return w[ids].astype(dtype)
    assert w.axis == 1, "rows are looked up in a QArray grouped along its second axis"
    rows = dataclasses.replace(w, values=w.values[ids], scale=w.scale[ids],
                               offset=None if w.offset is None else w.offset[ids])
    return dequantize(rows, dtype)


def leaves(tree):
    """The arrays of a params tree with each QArray as one leaf."""
    return jax.tree.leaves(tree, is_leaf=is_quantized)


def nbytes(tree) -> int:
    """Bytes of a params tree's arrays (packed values and scales counted as stored)."""
    return sum(x.nbytes if isinstance(x, QArray) else _nbytes(x) for x in leaves(tree))


def _form(x) -> tuple:
    if not isinstance(x, QArray):
        return ("float",)
    return (x.bits, x.zero, x.axis, x.group, np.dtype(x.values.dtype), np.dtype(x.scale.dtype),
            None if x.offset is None else np.dtype(x.offset.dtype))


def common_form(parts: tuple) -> tuple:
    """Parts of one fused field (host arrays, [in, out_i]) in one form, so each leaf concatenates: as they are where
    they share one; else QArrays as int8 values with float32 scales and offsets at the smallest group (which stands
    for the same numbers exactly: a GGUF file's Q4_K q/k with its Q6_K v); else (float and quantized mixed) all
    dequantized to the float parts' dtype."""
    forms = {_form(p) for p in parts}
    if len(forms) == 1:
        return parts
    if ("float",) in forms:
        dtype = next(p.dtype for p in parts if not isinstance(p, QArray))
        return tuple(dequantize(p, dtype) if isinstance(p, QArray) else p for p in parts)
    group = min(p.group for p in parts)
    return tuple(_as_int8(p, group) for p in parts)


def _as_int8(w: QArray, group: int) -> QArray:
    q = unpack_int4(w.values, w.axis) if w.bits == 4 else w.values
    q = (q.astype(np.int16) - w.zero).astype(np.int8)  # GGUF's codes are at most 6 bits: int8 holds them
    repeat = w.group // group
    scale = np.repeat(w.scale.astype(np.float32), repeat, axis=w.axis)
    offset = np.zeros_like(scale) if w.offset is None else np.repeat(w.offset.astype(np.float32), repeat, w.axis)
    return QArray(q, scale, offset, bits=8, zero=0, axis=w.axis)
