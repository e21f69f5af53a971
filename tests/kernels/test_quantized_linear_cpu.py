"""The XLA:CPU quantized matmuls (kernels_cpu/quantized_linear.cc) against the XLA path of qarray.linear, within
the error their int16 activations add (kernels_cpu.activation_error), and how the models reach them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_cpu
from jaxserve.quantization import qarray, schemes
from jaxserve.quantization.qarray import QArray, dequantize, linear, linear_rows
from kernels_cpu.quantized_linear import INT8_ROWS, PACKED4


def _packed4(rng, n_in: int, n_out: int, group: int, form: str) -> QArray:
    """A 4-bit QArray [n_in, n_out] in one of the forms the loaders make: GGUF Q4_1 (float16 scale and offset),
    Q4_0 (float16 scale, zero point 8) or the int4 scheme (float32 scale and offset)."""
    codes = rng.integers(0, 16, (n_in, n_out), dtype=np.uint8)
    dtype = np.float32 if form == "int4" else np.float16
    scale = rng.uniform(0.001, 0.02, (n_in // group, n_out)).astype(dtype)
    offset = None if form == "q4_0" else rng.normal(0, 0.1, (n_in // group, n_out)).astype(dtype)
    return QArray(qarray.pack_int4(codes, 0), scale, offset, bits=4, zero=8 if form == "q4_0" else 0, axis=0)


def _int8_rows(rng, n_out: int, n_in: int, group: int, dtype) -> QArray:
    codes = rng.integers(-128, 128, (n_out, n_in), dtype=np.int8)
    return QArray(codes, rng.uniform(0.001, 0.01, (n_out, n_in // group)).astype(dtype), None, bits=8, axis=1)


def _assert_within_activation_error(got, x, w_float, reference):
    """|kernel - reference| <= the int16 activations' bound, plus float32 rounding of a dot of this length."""
    bound = kernels_cpu.activation_error(x, np.abs(w_float)) + 1e-5 * (np.abs(x) @ np.abs(w_float)) + 1e-6
    np.testing.assert_array_less(np.abs(np.asarray(got) - np.asarray(reference)), bound)


def _lowered(f, *args) -> str:
    return jax.jit(f).lower(*args).as_text()


@pytest.mark.parametrize("form,group", [("q4_1", 32), ("q4_0", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("rows", [1, 5, 37])
def test_packed4_kernel_within_the_activation_bound(form, group, rows):
    """Tiles of 32 outputs (96: three), several groups, one to many activation rows."""
    rng = np.random.default_rng(rows)
    w = _packed4(rng, 256, 96, group, form)
    x = rng.normal(0, 1, (rows, 256)).astype(np.float32)
    x[0, :32] *= 30  # one block with a large scale: its error bound is its own
    w = jax.tree.map(jnp.asarray, w)
    assert PACKED4 in _lowered(linear, x, w)
    got = jax.jit(linear)(x, w)
    _assert_within_activation_error(got, x, np.asarray(dequantize(w)), x @ np.asarray(dequantize(w)))
    reference = jax.jit(lambda x, w: qarray._linear_xla(x, w, jnp.float32))(x, w)
    _assert_within_activation_error(got, x, np.asarray(dequantize(w)), reference)


@pytest.mark.parametrize("group,dtype", [(32, np.float16), (64, np.float32), (256, np.float32)])
def test_int8_rows_kernel_within_the_activation_bound(group, dtype):
    """An embedding table [out, in] as the LM head: x @ table.T, GGUF Q8_0 (groups of 32, float16 scales) and
    per-row scales (one group)."""
    rng = np.random.default_rng(group)
    table = jax.tree.map(jnp.asarray, _int8_rows(rng, 203, 256, group, dtype))
    x = rng.normal(0, 1, (6, 256)).astype(np.float32)
    assert INT8_ROWS in _lowered(linear_rows, x, table)
    got = jax.jit(linear_rows)(x, table)
    w = np.asarray(dequantize(table)).T
    assert got.shape == (6, 203)
    _assert_within_activation_error(got, x, w, x @ w)


def test_kernels_under_vmap_and_leading_axes():
    """lax.map with a batch size (vmap inside) and x with two leading axes compute what one flat call does."""
    rng = np.random.default_rng(3)
    w = jax.tree.map(jnp.asarray, _packed4(rng, 128, 64, 32, "q4_1"))
    table = jax.tree.map(jnp.asarray, _int8_rows(rng, 40, 128, 32, np.float16))
    x = rng.normal(0, 1, (12, 128)).astype(np.float32)
    for f in (lambda x: linear(x, w), lambda x: linear_rows(x, table)):
        flat = np.asarray(jax.jit(f)(x))
        mapped = jax.jit(lambda x: jax.lax.map(f, x[:, None], batch_size=4))(x)
        np.testing.assert_array_equal(np.asarray(mapped)[:, 0], flat)
        np.testing.assert_array_equal(np.asarray(jax.jit(f)(x.reshape(3, 4, 128))).reshape(12, -1), flat)


def test_forms_the_kernels_do_not_take_use_xla():
    """int8 columns, fp8, 16-wide groups, a width not a multiple of 32: the XLA path, exactly the reference."""
    rng = np.random.default_rng(4)
    w = rng.normal(0, 0.2, (128, 48)).astype(np.float32)
    x = rng.normal(0, 1, (3, 128)).astype(np.float32)
    cases = [schemes.quantize(w, "int8", 0), schemes.quantize(w, "fp8", 0), schemes.quantize(w, "int4", 0, 16),
             schemes.quantize(w, "int4", 0, 32)]  # (48 outputs: not whole tiles of 32)
    for q in map(lambda q: jax.tree.map(jnp.asarray, q), cases):
        assert "jaxserve_quantized_linear" not in _lowered(linear, x, q)
        np.testing.assert_array_equal(np.asarray(jax.jit(linear)(x, q)),
                                      np.asarray(jax.jit(lambda x, q: qarray._linear_xla(x, q, jnp.float32))(x, q)))


def test_other_platforms_lower_the_xla_path():
    """The choice is per platform: a TPU lowering of the same linear holds no CPU custom call."""
    rng = np.random.default_rng(5)
    w = jax.tree.map(jnp.asarray, _packed4(rng, 128, 64, 32, "q4_1"))
    x = jnp.zeros((2, 128), jnp.float32)
    text = jax.jit(linear).trace(x, w).lower(lowering_platforms=("tpu",)).as_text()
    assert "jaxserve_quantized_linear" not in text and "dot_general" in text


def test_bad_shapes_fail_clearly():
    rng = np.random.default_rng(6)
    w = _packed4(rng, 128, 64, 32, "q4_1")
    with pytest.raises(Exception, match="shapes or dtypes do not match"):  # scales for 32 of the 64 outputs
        jax.block_until_ready(kernels_cpu.packed4_columns(jnp.ones((1, 128)), w.values, w.scale[:, :32],
                                                          w.offset[:, :32], 0))
    with pytest.raises(Exception, match="shapes or dtypes do not match"):  # 128 inputs against 96
        jax.block_until_ready(kernels_cpu.int8_rows(jnp.ones((1, 96)), jnp.zeros((8, 128), jnp.int8),
                                                    jnp.ones((8, 4), jnp.float16)))
