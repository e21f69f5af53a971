"""What every model family shares: the step's batch, the paged KV cache, and the common layers.

A family (llama.py, ...) is a params pytree with the transformers tensor names it loads from, and a forward
pass `hidden_states(params, cache, batch, cfg, backend)` plus `final_logits(params, x, cfg)` over these types.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.models.config import ModelConfig
from jaxserve.quantization import qarray


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Paged K/V of every layer, one entry per layer as the kernels want it: [pages, page_size, 2 * kv_heads,
    head_dim], K of kv head h at 2h and V at 2h + 1 (kernels_pallas explains the layout); with a quantized cache
    (--kv-cache-dtype int8 / fp8) each entry is the pair (codes of that shape, scales [pages, page_size,
    2 * kv_heads] float32)."""

    kv: tuple

    @property
    def page_size(self) -> int:
        return jax.tree.leaves(self.kv[0])[0].shape[1]


KV_CACHE_DTYPES = {"auto": None, "int8": jnp.int8, "fp8": jnp.float8_e4m3fn, "fp8_e4m3": jnp.float8_e4m3fn}


def kv_code_dtype(kv_cache_dtype: str):
    """--kv-cache-dtype -> the quantized cache's code dtype, or None for a cache in the model's dtype."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown kv cache dtype {kv_cache_dtype!r}; choose one of {', '.join(KV_CACHE_DTYPES)}")
    return KV_CACHE_DTYPES[kv_cache_dtype]


def cache_shape(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple[int, int, int, int]:
    """One layer's cache array: [pages, page_size, 2 * kv_heads, head_dim]."""
    return (num_pages, page_size, 2 * cfg.num_kv_heads, cfg.head_dim)


def layer_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype, code_dtype=None):
    """One layer's cache as ShapeDtypeStructs: an array, or (codes, scales) when code_dtype is set."""
    shape = cache_shape(cfg, num_pages, page_size)
    if code_dtype is None:
        return jax.ShapeDtypeStruct(shape, dtype)
    return (jax.ShapeDtypeStruct(shape, code_dtype), jax.ShapeDtypeStruct(shape[:3], jnp.float32))


def ring_pages(cfg: ModelConfig, page_size: int, max_step_tokens: int) -> int:
    """Pages of one sequence's ring in each ringed layer (ModelConfig.ringed), 0 when no layer is: enough for the
    window before a step's first token (window - 1 tokens) and the step's own tokens (at most max_step_tokens), on
    pages not aligned with them (one more). A sequence's position p lives on ring page (p // page_size) % this."""
    windows = {cfg.layer_window(i) for i in range(cfg.num_layers) if cfg.ringed(i)}
    if not windows:
        return 0
    return -(-(max(windows) - 1 + max_step_tokens) // page_size) + 1


def ring_pages_of(cache: KVCache, cfg: ModelConfig, slots: int) -> int:
    """ring_pages as `cache` was allocated for `slots` sequence slots (0: no ringed layer)."""
    ringed = [i for i in range(cfg.num_layers) if cfg.ringed(i)]
    return jax.tree.leaves(cache.kv[ringed[0]])[0].shape[0] // slots if ringed else 0


def ring_tables(row_slots, ring: int, pages_per_seq: int):
    """row_slots: [S] each row's sequence slot -> block tables [S, P] into the ringed layers' caches, where slot s
    owns pages s * ring ... s * ring + ring - 1."""
    return row_slots[:, None] * ring + jnp.arange(pages_per_seq, dtype=jnp.int32)[None, :] % ring


def init_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype, sharding=None, code_dtype=None,
               ring_pages: int = 0) -> KVCache:
    """sharding: where each layer's entry lives, a tree like layer_cache's (None: default device). ring_pages: the
    pages of every sequence slot's rings together (slots x base.ring_pages), the size of the ringed layers' caches."""
    layers = [layer_cache(cfg, ring_pages if cfg.ringed(i) else num_pages, page_size, dtype, code_dtype)
              for i in range(cfg.num_layers)]
    if sharding is None:
        return KVCache(kv=tuple(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), layer) for layer in layers))
    zeros = lambda s, w: jnp.zeros(s.shape, s.dtype, device=w)  # noqa: E731
    return KVCache(kv=tuple(jax.tree.map(zeros, layer, sharding) for layer in layers))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Batch:
    """One engine step, padded to bucket sizes. T tokens, S sequences, P pages per sequence."""

    token_ids: jax.Array  # [T] int32
    positions: jax.Array  # [T] int32
    slot_mapping: jax.Array  # [T] int32: page * page_size + offset, -1 for padding tokens
    kv_lens: jax.Array  # [S] int32: context length after this step
    block_tables: jax.Array  # [S, P] int32
    cu_q_lens: jax.Array  # [S + 1] int32
    num_seqs: jax.Array  # [1] int32
    logits_indices: jax.Array  # [S] int32: the token whose logits each sequence needs (its last)
    # The same two for the ringed layers' caches (ModelConfig.ringed), where the model has them.
    ring_slot_mapping: jax.Array | None = None  # [T] int32
    ring_block_tables: jax.Array | None = None  # [S, P] int32

    def ringed(self) -> "Batch":
        """This batch as a ringed layer's attention reads it."""
        return dataclasses.replace(self, slot_mapping=self.ring_slot_mapping, block_tables=self.ring_block_tables)


def rms_norm(x, weight, eps):
    # Normalize in float32 and cast back before the weight, as transformers does, so bf16 matches it.
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return x32.astype(x.dtype) * weight


def rope_tables(positions, inv_freq, scale: float = 1.0):
    """positions: [T]; inv_freq: [rotary_dim // 2], or [T, rotary_dim // 2] per token -> (cos, sin)
    [T, rotary_dim // 2] float32, times `scale` (longrope's attention factor)."""
    angles = positions[:, None].astype(jnp.float32) * jnp.asarray(inv_freq)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def rope(cfg: ModelConfig, batch: Batch, layer: int = 0):
    """The step's rotary tables (cos, sin) [T, rotary_dim // 2] for layer `layer` (frequencies differ by layer only
    in Gemma 3). Longrope (Phi-3) picks its factors per sequence, as transformers picks them per forward call: the
    long ones for every token of a sequence whose context after this step (kv_lens) exceeds the original one, the
    short ones otherwise; models/phi3.py says how that compares with vLLM and llama.cpp."""
    s = cfg.rope_scaling
    if s is None or s.rope_type != "longrope":
        return rope_tables(batch.positions, cfg.layer_inv_freq(layer))
    t = batch.token_ids.shape[0]
    # Token i belongs to the sequence j with cu_q_lens[j] <= i < cu_q_lens[j + 1]; padding tokens past the last
    # sequence are clipped onto it (their outputs are discarded).
    seq = jnp.minimum(jnp.searchsorted(batch.cu_q_lens[1:], jnp.arange(t), side="right"), batch.kv_lens.shape[0] - 1)
    long = (batch.kv_lens > s.original_max_position_embeddings)[seq]  # [T]
    inv_freq = jnp.where(long[:, None], cfg.layer_inv_freq(layer, long=True), cfg.layer_inv_freq(layer))
    return rope_tables(batch.positions, inv_freq, s.attention_factor)


def apply_rope(x, cos, sin):
    """x: [T, heads, head_dim]; cos/sin: [T, rotary_dim // 2]. Half-split (GPT-NeoX) layout, as HF Llama uses, over
    the first rotary_dim dims of each head (all of them unless partial rotary); the rest pass unchanged."""
    rot = 2 * cos.shape[-1]
    x1, x2 = jnp.split(x[..., :rot].astype(jnp.float32), 2, axis=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)
    return out if rot == x.shape[-1] else jnp.concatenate([out, x[..., rot:]], axis=-1)


def tensor_reader(tensors, expected, dtype):
    """`read(name, transpose=False)` over a checkpoint's tensors (float arrays or QArrays under transformers' names,
    [out, in] for linear weights): float arrays cast to dtype, transposed to [in, out] where asked. Raises first
    if any name of `expected` (the family's hf_shapes) is missing."""
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")

    def read(name, transpose=False):
        a = tensors[name]
        if isinstance(a, qarray.QArray):
            return a.T if transpose else a
        a = np.asarray(a)
        return (a.T if transpose else a).astype(dtype, copy=False)

    return read


def count_params(params) -> int:
    """Parameters of a params tree, a quantized matrix counted by its logical shape."""
    return sum(int(np.prod(x.shape)) for x in qarray.leaves(params))
