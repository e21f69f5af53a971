"""Matmuls of float activations with integer weight codes on XLA:CPU (quantized_linear.cc): the weights' values are
scale * (code - zero) + offset  per group of `group` inputs. Their reference is the XLA path of
jaxserve.quantization.qarray.linear, which TPU and GPU run and which takes the same QArray fields.

The kernels quantize the activations to int16 per 32 inputs, which adds at most
sum_i |w_i| * amax(x's block of i) / 65534  to each output (`activation_error`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 32  # inputs per activation scale in the kernels
PACKED4 = "jaxserve_quantized_linear_packed4"  # the FFI targets (kernels_cpu.enabled(target): registered)
INT8_ROWS = "jaxserve_quantized_linear_int8_rows"
# Under vmap the kernels get x [batch, T, in] and the weights with leading dimensions of 1, which they take as one
# matmul of batch * T rows.
_VMAP = "expand_dims"


def packed4_columns(x, codes, scale, offset, zero: int):
    """x [T, in] float32 @ w [in, out], w's 4-bit codes [in // 2, out] uint8 (inputs 2i, 2i + 1 in a byte's low,
    high nibble), scale and offset (or None) [in // group, out] float16/32 -> [T, out] float32. XLA:CPU only;
    in, group multiples of 32, out of 32."""
    out = jax.ShapeDtypeStruct((x.shape[0], codes.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(PACKED4, out, vmap_method=_VMAP)(
        x.astype(jnp.float32), codes, scale, scale if offset is None else offset,
        group=np.int64(x.shape[1] // scale.shape[0]), zero=np.int64(zero), has_offset=offset is not None)


def int8_rows(x, codes, scale):
    """x [T, in] float32 @ w.T, w's int8 codes [out, in] with scale [out, in // group] float16/32 (an embedding
    table as the LM head) -> [T, out] float32. XLA:CPU only; in, group multiples of 32."""
    out = jax.ShapeDtypeStruct((x.shape[0], codes.shape[0]), jnp.float32)
    call = jax.ffi.ffi_call(INT8_ROWS, out, vmap_method=_VMAP)
    return call(x.astype(jnp.float32), codes, scale)


def activation_error(x, w_abs):
    """The most the kernels' int16 activations add to each output: x [T, in], w_abs [in, out] the weights' absolute
    float values -> [T, out] (half a step of x's block scale amax / 32767, times |w|, summed)."""
    x = np.asarray(x, np.float32)
    amax = np.abs(x.reshape(x.shape[0], -1, BLOCK)).max(-1)
    return np.repeat(amax / 65534, BLOCK, axis=1) @ np.asarray(w_abs, np.float32)
