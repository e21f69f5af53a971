"""Quantizing a float checkpoint at load (`--quantization`), tensor by tensor on the host.

    int8  symmetric, one scale per output channel           values int8, scale float32
    int4  per group of `group` inputs, a scale and an offset   values 0..15 packed two per byte, w = scale * q + min
          (the group's range in 16 levels, as AWQ, GPTQ and GGUF's Q4_1 do); a dimension that `group` does not
          divide takes the largest power-of-two group (>= 16) that does: 64 for SmolLM2's 576
    fp8   float8_e4m3fn, one scale per output channel        (TPU v6e and later, CUDA compute capability 8.9+)

Each quantizer takes a float array and the axis it is contracted over (0 for a [in, out] linear weight, 1 for the
[vocab, hidden] embedding) and returns a QArray on the host.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_dtypes
import numpy as np

from jaxserve.quantization.qarray import QArray, grouped, pack_int4

SCHEMES = ("int8", "int4", "fp8")
DEFAULT_INT4_GROUP = 128  # AWQ's and GPTQ's usual group size
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448


def _absmax(a: np.ndarray, axis: int, group: int) -> np.ndarray:
    """max |a| per group of `group` along axis: [.., n, ..] -> [.., n // group, ..], float32, never 0."""
    m = np.abs(grouped(a.astype(np.float32), axis, group)).max(axis=axis + 1)
    return np.where(m > 0, m, np.float32(1))


def _repeat(scale: np.ndarray, axis: int, group: int) -> np.ndarray:
    return np.repeat(scale, group, axis=axis)


def quantize_int8(a: np.ndarray, axis: int) -> QArray:
    scale = _absmax(a, axis, a.shape[axis]) / np.float32(127)
    q = np.clip(np.rint(a.astype(np.float32) / scale), -127, 127).astype(np.int8)
    return QArray(values=q, scale=scale, offset=None, bits=8, zero=0, axis=axis)


def int4_group(n: int, group: int) -> int:
    """The group int4 uses along a dimension of n: `group` where it divides n, else the largest power of two
    below it (down to 16) that does."""
    size = group
    while n % size and size > 16:
        size //= 2
    if n % size or size % 2:
        raise ValueError(f"int4 groups of {group} (or a power of two down to 16) do not divide a dimension of {n}")
    return size


def _range(a: np.ndarray, axis: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) per group of `group` along axis, float32: [.., n // group, ..] each."""
    groups = grouped(a.astype(np.float32), axis, group)
    return groups.min(axis=axis + 1), groups.max(axis=axis + 1)


def quantize_int4(a: np.ndarray, axis: int, group: int = DEFAULT_INT4_GROUP) -> QArray:
    group = int4_group(a.shape[axis], group)
    low, high = _range(a, axis, group)
    scale = np.where(high > low, (high - low) / np.float32(15), np.float32(1))
    q = np.clip(np.rint((a.astype(np.float32) - _repeat(low, axis, group)) / _repeat(scale, axis, group)), 0, 15)
    return QArray(values=pack_int4(q.astype(np.uint8), axis), scale=scale, offset=low, bits=4, zero=0, axis=axis)


def quantize_fp8(a: np.ndarray, axis: int) -> QArray:
    scale = _absmax(a, axis, a.shape[axis]) / np.float32(FP8_MAX)
    q = (a.astype(np.float32) / scale).astype(ml_dtypes.float8_e4m3fn)
    return QArray(values=q, scale=scale, offset=None, bits=8, zero=0, axis=axis)


def quantize(a: np.ndarray, scheme: str, axis: int, group: int = DEFAULT_INT4_GROUP) -> QArray:
    if scheme == "int8":
        return quantize_int8(a, axis)
    if scheme == "int4":
        return quantize_int4(a, axis, group)
    if scheme == "fp8":
        return quantize_fp8(a, axis)
    raise ValueError(f"unknown quantization {scheme!r}; choose one of {', '.join(SCHEMES)}")


def error_bound(a: np.ndarray, scheme: str, axis: int, group: int = DEFAULT_INT4_GROUP) -> np.ndarray:
    """The largest |w - dequantize(quantize(w))| each element can have, [a's shape]: half a step for the integer
    schemes (step: int8 absmax / 127 of its column, int4 (max - min) / 15 of its group), and for fp8 half a unit in
    the last place of e4m3's 3-bit mantissa at the element's magnitude (2^-4 relative), or half its smallest
    subnormal step below the normal range, times the scale."""
    a = np.asarray(a, np.float32)
    if scheme == "int8":
        return np.broadcast_to(_absmax(a, axis, a.shape[axis]) / 254, a.shape)
    if scheme == "int4":
        group = int4_group(a.shape[axis], group)
        low, high = _range(a, axis, group)
        return np.broadcast_to(_repeat((high - low) / 30, axis, group), a.shape)
    scale = _absmax(a, axis, a.shape[axis]) / np.float32(FP8_MAX)
    scaled = np.abs(a) / scale
    return np.maximum(scaled * 2.0 ** -4, 2.0 ** -10) * scale


def check_backend(scheme: str, platform: str, device_kind: str, compute_capability: str | None = None) -> None:
    """Raises ValueError where a device (jax's platform and device_kind, a GPU's compute capability) cannot compute
    with `scheme`'s values: fp8 needs TPU v6e or later, or a CUDA GPU of compute capability 8.9 or later. XLA:CPU
    converts fp8 in software: allowed, it is where the numerics are tested."""
    if scheme != "fp8":
        return
    if platform == "tpu" and any(old in device_kind.lower() for old in ("v2", "v3", "v4", "v5")):
        raise ValueError(f"fp8 weights need TPU v6e or later ({device_kind} has no fp8 matmul); "
                         "use --quantization int8")
    if platform in ("gpu", "cuda") and compute_capability is not None:
        if tuple(int(x) for x in str(compute_capability).split(".")) < (8, 9):
            raise ValueError(f"fp8 weights need a GPU of compute capability 8.9 or later (Ada, Hopper); "
                             f"{device_kind} is {compute_capability}; use --quantization int8")


# The params fields a scheme quantizes, by the axis each is contracted over (the model families' field names).
LAYER_FIELDS = {"wqkv": 0, "wo": 0, "w_gate_up": 0, "w_down": 0,
                "w_gate_exps": 1, "w_up_exps": 1, "w_down_exps": 1}  # experts: [experts, in, out]
HEAD_FIELDS = {"lm_head": 0, "embed": 1}  # with `lm_head=True`


@dataclasses.dataclass(frozen=True)
class WeightQuantization:
    """What `--quantization` asks of the loader: quantize the decoder layers' matrices (and with lm_head, the LM head
    and the embeddings) with `scheme` as each field is placed."""

    scheme: str
    group: int = DEFAULT_INT4_GROUP  # int4's group size
    lm_head: bool = False

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown quantization {self.scheme!r}; choose one of none, {', '.join(SCHEMES)}")

    def axis(self, name: str) -> int | None:
        """The axis field `name` is quantized along, or None where it stays as it is."""
        return LAYER_FIELDS.get(name, HEAD_FIELDS.get(name) if self.lm_head else None)

    def __call__(self, array, name: str):
        """A field as placed: float arrays of quantized fields become QArrays (QArrays from a GGUF file stay)."""
        axis = self.axis(name)
        if axis is None or isinstance(array, QArray):
            return array
        return quantize(np.asarray(array), self.scheme, axis, self.group)

    def abstract(self, struct: jax.ShapeDtypeStruct, name: str):
        """__call__'s result as ShapeDtypeStructs (`jaxserve check`), without data."""
        axis = self.axis(name)
        if axis is None:
            return struct
        shape = list(struct.shape)
        group = int4_group(shape[axis], self.group) if self.scheme == "int4" else shape[axis]
        scale = shape.copy()
        scale[axis] //= group
        if self.scheme == "int4":
            shape[axis] //= 2
        dtype = {"int8": np.int8, "int4": np.uint8, "fp8": ml_dtypes.float8_e4m3fn}[self.scheme]
        scale = jax.ShapeDtypeStruct(tuple(scale), np.float32)
        return QArray(jax.ShapeDtypeStruct(tuple(shape), dtype), scale, scale if self.scheme == "int4" else None,
                      bits=4 if self.scheme == "int4" else 8, zero=0, axis=axis)
