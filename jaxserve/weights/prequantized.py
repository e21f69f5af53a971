"""Transformers checkpoints published already quantized, read as QArrays under the plain `<layer>.weight` names.

The formats, as their `quantization_config` names them (weights [out, in], groups along `in`):

    fp8                 weight float8_e4m3fn, weight_scale_inv float32 per 128 x 128 block    w = weight * scale_inv
    compressed-tensors  weight float8_e4m3fn, weight_scale float32 per row [out, 1] or one   w = weight * scale
    awq (GEMM)          qweight int32 [in, out / 8], qzeros int32 [in / g, out / 8],          w = (q - z) * scales
                        scales [in / g, out]; 4-bit codes in the order 0 2 4 6 1 3 5 7
    gptq                qweight int32 [in / 8, out], qzeros int32 [in / g, out / 8] (zero - 1 unless
                        checkpoint_format gptq_v2), scales [in / g, out], g_idx [in]           w = (q - z) * scales

A block scale becomes one scale per row and group (the same number repeated for the block's 128 rows); AWQ's and
GPTQ's zero points become offsets, w = scales * q + (-scales * z) (the products are exact in float32).
"""

from __future__ import annotations

from collections.abc import Mapping

import ml_dtypes
import numpy as np

from jaxserve.quantization.qarray import QArray, dequantize, pack_int4

_AWQ_ORDER = np.array([0, 4, 1, 5, 2, 6, 3, 7])  # column j of each 8 lies in nibble _AWQ_ORDER[j]
_AUX = ("qweight", "qzeros", "scales", "g_idx", "weight_scale", "weight_scale_inv", "input_scale")


def stored_quantization(hf_config: dict) -> str | None:
    """The checkpoint's own quantization ("fp8", "awq", "gptq") or None; raises for kinds not read here."""
    config = hf_config.get("quantization_config")
    if not config:
        return None
    method = config.get("quant_method")
    if method == "fp8" or (method == "compressed-tensors" and _compressed_fp8(config)):
        return "fp8"
    if method in ("awq", "gptq"):
        if config.get("bits", 4) != 4:
            raise ValueError(f"{method} checkpoints of {config.get('bits')} bits are not supported (4 bits are)")
        if method == "awq" and str(config.get("version", "gemm")).lower() != "gemm":
            raise ValueError(f"AWQ version {config.get('version')!r} is not supported (GEMM is)")
        return method
    raise ValueError(f"checkpoint quantization {method!r} is not supported; supported: fp8 (and compressed-tensors "
                     "fp8 weights), awq, gptq")


def _compressed_fp8(config: dict) -> bool:
    groups = config.get("config_groups") or {}
    weights = [g.get("weights") or {} for g in groups.values()]
    return bool(weights) and all(w.get("type") == "float" and w.get("num_bits") == 8 for w in weights)


class QuantizedTensors(Mapping):
    """`tensors` (a checkpoint's, read lazily) with each quantized linear layer as one `<prefix>.weight` entry: a
    QArray [out, in] grouped along axis 1, or, with keep=False, its float32 dequantization."""

    def __init__(self, tensors: Mapping, hf_config: dict, keep: bool):
        self._tensors, self._keep = tensors, keep
        self._config = hf_config["quantization_config"]
        self._method = stored_quantization(hf_config)
        self._names = [n for n in tensors if n.rsplit(".", 1)[-1] not in _AUX]
        self._names += [n.removesuffix(".qweight") + ".weight" for n in tensors if n.endswith(".qweight")]

    def __getitem__(self, name: str):
        prefix = name.removesuffix(".weight")
        if self._method in ("awq", "gptq") and prefix + ".qweight" in self._tensors:
            q = _int4(self._tensors, prefix, self._method, self._config)
        elif self._method == "fp8" and (prefix + ".weight_scale_inv" in self._tensors
                                        or prefix + ".weight_scale" in self._tensors):
            q = _fp8(self._tensors, prefix, self._config)
        else:
            return self._tensors[name]
        return q if self._keep else dequantize(q)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _fp8(tensors: Mapping, prefix: str, config: dict) -> QArray:
    weight = np.asarray(tensors[prefix + ".weight"]).view(ml_dtypes.float8_e4m3fn)
    out, n = weight.shape
    if prefix + ".weight_scale_inv" in tensors:  # block scales [ceil(out / rows), ceil(in / block)]
        blocks = np.asarray(tensors[prefix + ".weight_scale_inv"], np.float32)
        rows, block = config.get("weight_block_size") or (128, 128)
        if n % block:
            raise ValueError(f"{prefix}: fp8 blocks of {block} inputs do not divide its {n} inputs")
        scale = np.repeat(blocks, rows, axis=0)[:out]
    else:  # per row [out, 1], or one for the tensor
        scale = np.broadcast_to(np.asarray(tensors[prefix + ".weight_scale"], np.float32).reshape(-1, 1), (out, 1))
    return QArray(weight, np.ascontiguousarray(scale), None, bits=8, axis=1)


def _nibbles(packed: np.ndarray, axis: int) -> np.ndarray:
    """int32 holding 8 4-bit codes (nibble i = element 8k + i along axis) -> uint8 codes, 8x longer along axis."""
    codes = (packed.astype(np.uint32)[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 15
    codes = codes.astype(np.uint8)  # [..., 8]: the 8 codes of each int32, in nibble order
    if axis == -1 or axis == packed.ndim - 1:
        return codes.reshape(packed.shape[:-1] + (-1,))
    return np.moveaxis(codes, -1, axis + 1).reshape((-1,) + packed.shape[1:])


def _int4(tensors: Mapping, prefix: str, method: str, config: dict) -> QArray:
    scales = np.asarray(tensors[prefix + ".scales"])  # [in / g, out]
    zeros = _nibbles(np.asarray(tensors[prefix + ".qzeros"]), -1)  # [in / g, out]
    if method == "awq":
        q = _nibbles(np.asarray(tensors[prefix + ".qweight"]), -1)  # [in, out] in AWQ's column order
        q = _awq_columns(q)
        zeros = _awq_columns(zeros)
    else:
        q = _nibbles(np.asarray(tensors[prefix + ".qweight"]), 0)  # [in, out]
        if config.get("checkpoint_format", "gptq") != "gptq_v2":
            zeros = zeros + 1  # GPTQ v1 stores each zero point minus one
        group = q.shape[0] // scales.shape[0]
        g_idx = tensors.get(prefix + ".g_idx")
        if g_idx is not None and not np.array_equal(np.asarray(g_idx), np.arange(q.shape[0]) // group):
            raise ValueError(f"{prefix}: GPTQ with act-order (desc_act) groups is not supported")
    offset = -scales.astype(np.float32) * zeros.astype(np.float32)
    return QArray(pack_int4(q.T, 1), np.ascontiguousarray(scales.T), np.ascontiguousarray(offset.T), bits=4, axis=1)


def _awq_columns(codes: np.ndarray) -> np.ndarray:
    lead = codes.shape[:-1]
    return codes.reshape(lead + (-1, 8))[..., _AWQ_ORDER].reshape(codes.shape)
