"""GGUF's block quantizations (llama.cpp's ggml formats) as QArrays, without dequantizing.

Every kept type is a grouped affine code, so it maps onto QArray exactly: the same integers, and scales and
offsets such that `dequantize` performs the gguf package's own float32 arithmetic (tested per type against it):

    Q8_0  groups of 32   w = d * q             q int8,           d float16
    Q4_0  groups of 32   w = d * (q - 8)       q 4-bit, packed,  d float16
    Q4_1  groups of 32   w = d * q + m         q 4-bit, packed,  d, m float16
    Q5_0  groups of 32   w = d * (q - 16)      q 5-bit (held as int8, q - 16)
    Q5_1  groups of 32   w = d * q + m         q 5-bit (held as int8)
    Q4_K  groups of 32   w = (d*sc) * q - (dmin*m)   q 4-bit, packed; 256-blocks' 6-bit sub-scales folded into
    Q5_K  groups of 32   the same, q 5-bit (int8)     float32 scales and offsets
    Q6_K  groups of 16   w = (d*sc) * (q - 32)        q 6-bit (held as int8, q - 32)

Input is a tensor's raw blocks as the gguf reader maps them: uint8 [rows, bytes per row], blocks along each row.
The output is [rows, n] grouped along axis 1 (the GGUF/transformers [out, in] layout).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT

from jaxserve.quantization.qarray import QArray, pack_int4

QK_K = 256


def _split(blocks: np.ndarray, *sizes: int) -> list[np.ndarray]:
    return np.split(blocks, np.cumsum(sizes), axis=-1)


def _f16(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(np.float16)[..., 0]


def _nibbles(qs: np.ndarray, run: int) -> np.ndarray:
    """[.., k * run / 2] bytes whose runs of `run`/2 hold elements i (low nibble) and i + run/2 (high) -> [.., k * run]
    uint8 values in element order."""
    lead = qs.shape[:-1]
    qs = qs.reshape(lead + (-1, 1, run // 2)) >> np.array([0, 4], np.uint8).reshape(2, 1)
    return (qs & 15).reshape(lead + (-1,))


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and mins -> [blocks, 8] each."""
    d, m, md = np.split(scales.reshape(scales.shape[:-1] + (3, 4)), 3, axis=-2)
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.reshape(scales.shape[:-1] + (8,)), mins.reshape(scales.shape[:-1] + (8,))


def _five_bit_high(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's 4 bytes of high bits (a little-endian uint32, bit i for element i) -> [.., 32] uint8."""
    bits = np.ascontiguousarray(qh).view("<u4") >> np.arange(32, dtype=np.uint32)
    return (bits & 1).astype(np.uint8)


def _blocks(data: np.ndarray, rows: int, block_bytes: int) -> np.ndarray:
    return np.asarray(data, np.uint8).reshape(rows, -1, block_bytes)


def from_gguf(data: np.ndarray, qtype: QT, shape: tuple[int, int]) -> QArray:
    """One GGUF tensor [rows, n] (data: uint8 [rows, bytes per row]) as a QArray grouped along axis 1."""
    rows, n = shape
    if qtype == QT.Q8_0:
        d, q = _split(_blocks(data, rows, 34), 2)
        return QArray(q.view(np.int8).reshape(rows, n), _f16(d), None, bits=8, axis=1)
    if qtype in (QT.Q4_0, QT.Q4_1):
        with_min = qtype == QT.Q4_1
        parts = _split(_blocks(data, rows, 20 if with_min else 18), *((2, 2) if with_min else (2,)))
        q = _nibbles(parts[-1], 32).reshape(rows, n)
        return QArray(pack_int4(q, 1), _f16(parts[0]), _f16(parts[1]) if with_min else None,
                      bits=4, zero=0 if with_min else 8, axis=1)
    if qtype in (QT.Q5_0, QT.Q5_1):
        with_min = qtype == QT.Q5_1
        parts = _split(_blocks(data, rows, 24 if with_min else 22), *((2, 2, 4) if with_min else (2, 4)))
        q = _nibbles(parts[-1], 32) | (_five_bit_high(parts[-2]).reshape(rows, -1, 32) << 4)
        q = q.reshape(rows, n).astype(np.int8)
        if not with_min:
            return QArray(q - np.int8(16), _f16(parts[0]), None, bits=8, axis=1)
        return QArray(q, _f16(parts[0]), _f16(parts[1]), bits=8, axis=1)
    if qtype in (QT.Q4_K, QT.Q5_K):
        five = qtype == QT.Q5_K
        parts = _split(_blocks(data, rows, 176 if five else 144), 2, 2, 12, *((32,) if five else ()))
        d, dmin = _f16(parts[0]).astype(np.float32), _f16(parts[1]).astype(np.float32)
        sc, mins = _k_scales(parts[2])
        scale = (d[..., None] * sc.astype(np.float32)).reshape(rows, -1)
        offset = -(dmin[..., None] * mins.astype(np.float32)).reshape(rows, -1)
        q = _nibbles(parts[-1], 64)  # [rows, blocks, 256]: each 32 bytes hold sub-blocks 2c (low) and 2c + 1 (high)
        if not five:
            return QArray(pack_int4(q.reshape(rows, n), 1), scale, offset, bits=4, axis=1)
        high = (parts[3][..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # [rows, blocks, 8, 32]
        q = q | (high.reshape(q.shape) << 4)
        return QArray(q.reshape(rows, n).astype(np.int8), scale, offset, bits=8, axis=1)
    if qtype == QT.Q6_K:
        ql, qh, sc, d = _split(_blocks(data, rows, 210), QK_K // 2, QK_K // 4, QK_K // 16)
        low = _nibbles(ql.reshape(rows, -1, 2, 64), 128)  # [rows, blocks, halves, 128]
        high = (qh.reshape(rows, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3
        q = (low | (high.reshape(low.shape) << 4)).astype(np.int8) - np.int8(32)
        scale = (_f16(d).astype(np.float32)[..., None] * sc.view(np.int8).astype(np.float32)).reshape(rows, -1)
        return QArray(q.reshape(rows, n), scale, None, bits=8, axis=1)
    raise ValueError(f"GGUF tensor type {qtype.name} is not kept quantized")


KEPT = frozenset({QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K})


def kept_on_cpu(name: str, qtype: QT) -> bool:
    """The matrices XLA:CPU's kernels multiply from their codes (kernels_cpu/quantized_linear.cc): 4-bit ones in
    groups of 32, and an 8-bit embedding table (the tied LM head's rows). Others are dequantized on CPU."""
    return qtype in (QT.Q4_0, QT.Q4_1, QT.Q4_K) or (qtype == QT.Q8_0 and name == "token_embd.weight")
