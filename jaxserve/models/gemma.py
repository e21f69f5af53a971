"""The Gemma 2 and Gemma 3 (text) family: its params pytree, the transformers tensors it loads from, and its decoder.

What differs from Llama (llama.py, whose attention and gated MLP it calls):
- RMSNorm scales by (1 + w), multiplied in float32 before the cast back (transformers' Gemma norms);
- a norm before and after both attention and MLP (the "sandwich"), and per-head q/k norms in Gemma 3;
- GeGLU (tanh gelu) MLP; embeddings scaled by sqrt(hidden) in the model's dtype; attention scaled by
  query_pre_attn_scalar ** -0.5;
- tanh soft caps on attention scores and final logits (Gemma 2);
- per-layer kinds (cfg.layer_types): sliding layers attend within cfg.sliding_window, full layers to everything;
  in Gemma 3 the sliding layers have their own rope base (cfg.local_rope_theta) and no rope scaling. Sliding
  layers keep their K/V in per-sequence rings of pages (ModelConfig.ringed), read through the batch's ring fields.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.models import attention, llama
from jaxserve.models.base import Batch, KVCache, rope_tables
from jaxserve.models.config import ModelConfig
from jaxserve.quantization.qarray import QArray, take_rows


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Layer:
    attn_norm: jax.Array  # [hidden]
    wqkv: jax.Array  # [hidden, (q_heads + 2 * kv_heads) * head_dim], grouped as llama.Layer.wqkv
    wo: jax.Array  # [q_heads * head_dim, hidden]
    post_attn_norm: jax.Array  # [hidden]
    mlp_norm: jax.Array  # [hidden]
    w_gate_up: jax.Array  # [hidden, 2 * intermediate], grouped as llama.Layer.w_gate_up
    w_down: jax.Array  # [intermediate, hidden]
    post_mlp_norm: jax.Array  # [hidden]
    q_norm: jax.Array | None = None  # [head_dim]  (Gemma 3)
    k_norm: jax.Array | None = None  # [head_dim]  (Gemma 3)


Params = llama.Params  # embed, layers (of this Layer), final_norm, lm_head (None: tied, as Gemma's are)


def gemma_norm(x, weight, eps):
    """RMSNorm scaling by (1 + weight), in float32 before the cast back (unlike Llama's), as transformers does."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


def hidden_states(params: Params, cache: KVCache, batch: Batch, cfg: ModelConfig, backend: attention.Backend):
    """Returns (the last layer's output [T, hidden] for every token, before the final norm; updated cache)."""
    dtype = params.final_norm.dtype
    # transformers rounds the scale to the model's dtype before multiplying (sqrt(2304) is not exact in bf16).
    x = take_rows(params.embed, batch.token_ids, dtype) * jnp.asarray(cfg.hidden_size**0.5, dtype)  # [T, hidden]
    rope = {}  # one (cos, sin) per distinct rope, shared by the layers that use it
    kvs = []
    for i, (layer, kv_pages) in enumerate(zip(params.layers, cache.kv)):
        inv_freq = cfg.layer_inv_freq(i)
        key = inv_freq.tobytes()
        if key not in rope:
            rope[key] = rope_tables(batch.positions, inv_freq)
        layer_batch = batch.ringed() if cfg.ringed(i) else batch
        x, kv_pages = _decoder_layer(layer, x, *rope[key], kv_pages, layer_batch, cfg, backend, cfg.layer_window(i))
        kvs.append(kv_pages)
    return x, KVCache(kv=tuple(kvs))


@functools.partial(jax.jit, static_argnames=("cfg", "backend", "window"))
def _decoder_layer(layer: Layer, x, cos, sin, kv_pages, batch: Batch, cfg: ModelConfig, backend: attention.Backend,
                   window: int | None):
    """One decoder layer: x [T, hidden] -> x, and its kv_pages with this step's K/V written. Traced once per layer
    kind (sliding / full)."""
    eps = cfg.rms_norm_eps
    h = gemma_norm(x, layer.attn_norm, eps)
    out, kv_pages = llama.attend(layer, h, cos, sin, kv_pages, batch, cfg, backend, window, norm=gemma_norm)
    x = x + gemma_norm(out, layer.post_attn_norm, eps)
    out = llama.gated_mlp(layer, gemma_norm(x, layer.mlp_norm, eps), cfg)
    return x + gemma_norm(out, layer.post_mlp_norm, eps), kv_pages


def final_logits(params: Params, x, cfg: ModelConfig):
    """x: [N, hidden] last-layer outputs -> logits [N, vocab] float32, soft-capped where configured."""
    logits = llama.head_logits(params, gemma_norm(x, params.final_norm, cfg.rms_norm_eps))
    cap = cfg.final_logit_softcapping
    return logits if cap is None else cap * jnp.tanh(logits / cap)


# Gemma's four norms per layer (Llama's other tensors and names otherwise: llama.params_from_hf reads them).
_NORM = {"attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
         "mlp_norm": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"}


def params_from_hf(tensors: Mapping[str, np.ndarray | QArray], cfg: ModelConfig, dtype, put) -> Params:
    """As llama.params_from_hf, with Gemma's norms and Layer. A Gemma 3 checkpoint with vision keeps its text
    decoder under another prefix; it is read from there."""
    return llama.params_from_hf(_text_decoder(tensors), cfg, dtype, put, norms=_NORM, layer_type=Layer)


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every transformers tensor this family loads for `cfg`, with its shape ([out, in] for linear weights)."""
    return llama.hf_shapes(cfg, _NORM)


# Where Gemma3ForConditionalGeneration checkpoints keep the text decoder: transformers 4 wrote
# "language_model.model.", transformers 5 writes "model.language_model.".
_TEXT_PREFIXES = ("language_model.model.", "model.language_model.")


def _text_decoder(tensors: Mapping) -> Mapping:
    if "model.embed_tokens.weight" in tensors:
        return tensors
    for prefix in _TEXT_PREFIXES:
        if prefix + "embed_tokens.weight" in tensors:
            return _Renamed(tensors, prefix)
    return tensors


class _Renamed(Mapping):
    """A view of `tensors` where "model.X" reads prefix + "X" (tensors may load lazily: nothing is read here)."""

    def __init__(self, tensors: Mapping, prefix: str):
        self._tensors, self._prefix = tensors, prefix

    def _name(self, key: str) -> str:
        return self._prefix + key.removeprefix("model.") if key.startswith("model.") else key

    def __getitem__(self, key):
        return self._tensors[self._name(key)]

    def __contains__(self, key):
        return self._name(key) in self._tensors

    def __iter__(self):
        return (("model." + k.removeprefix(self._prefix)) for k in self._tensors if k.startswith(self._prefix))

    def __len__(self):
        return sum(1 for _ in self)
