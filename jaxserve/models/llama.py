"""The Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM2): its params pytree, the transformers tensors it loads
from, and its decoder as pure functions.

One forward serves every step of the engine: a flat batch of tokens from many sequences (prefill chunks and
single decode tokens mixed), their K/V written into the paged cache, attention read back from it. The model
does not know which attention backend runs: `attention.py` is the one dispatch point.

Layers are a Python tuple, unrolled under jit: measured ~3x faster per step on CPU than `lax.scan` over
stacked layers (design.md), at the price of a longer compile.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.models import attention
from jaxserve.models.config import ModelConfig
from jaxserve.models.base import Batch, KVCache, apply_rope, rms_norm


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Layer:
    attn_norm: jax.Array  # [hidden]
    wq: jax.Array  # [hidden, q_heads * head_dim]
    wk: jax.Array  # [hidden, kv_heads * head_dim]
    wv: jax.Array  # [hidden, kv_heads * head_dim]
    wo: jax.Array  # [q_heads * head_dim, hidden]
    mlp_norm: jax.Array  # [hidden]
    w_gate: jax.Array  # [hidden, intermediate]
    w_up: jax.Array  # [hidden, intermediate]
    w_down: jax.Array  # [intermediate, hidden]
    bq: jax.Array | None = None  # [q_heads * head_dim]   (Qwen2)
    bk: jax.Array | None = None  # [kv_heads * head_dim]  (Qwen2)
    bv: jax.Array | None = None  # [kv_heads * head_dim]  (Qwen2)
    q_norm: jax.Array | None = None  # [head_dim]  (Qwen3)
    k_norm: jax.Array | None = None  # [head_dim]  (Qwen3)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Params:
    embed: jax.Array  # [vocab, hidden]
    layers: tuple[Layer, ...]
    final_norm: jax.Array  # [hidden]
    lm_head: jax.Array | None  # [hidden, vocab]; None when tied to `embed`


def _attention_block(layer: Layer, x, cos, sin, kv_pages, batch: Batch, cfg: ModelConfig,
                     backend: attention.Backend):
    t = x.shape[0]
    h = rms_norm(x, layer.attn_norm, cfg.rms_norm_eps)
    q, k, v = h @ layer.wq, h @ layer.wk, h @ layer.wv
    if cfg.qkv_bias:
        q, k, v = q + layer.bq, k + layer.bk, v + layer.bv
    q = q.reshape(t, cfg.num_heads, cfg.head_dim)
    k = k.reshape(t, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, layer.q_norm, cfg.rms_norm_eps)
        k = rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out, kv_pages = attention.paged_attention(q, k, v, kv_pages, batch, cfg, backend)
    return x + out.reshape(t, -1) @ layer.wo, kv_pages


def _mlp_block(layer: Layer, x, cfg: ModelConfig):
    h = rms_norm(x, layer.mlp_norm, cfg.rms_norm_eps)
    return x + (jax.nn.silu(h @ layer.w_gate) * (h @ layer.w_up)) @ layer.w_down


def forward(params: Params, cache: KVCache, batch: Batch, cfg: ModelConfig, backend: attention.Backend):
    """Returns (logits [S, vocab] float32 for each sequence's `logits_indices` token, updated cache)."""
    x, cache = hidden_states(params, cache, batch, cfg, backend)
    return final_logits(params, x[batch.logits_indices], cfg), cache


def hidden_states(params: Params, cache: KVCache, batch: Batch, cfg: ModelConfig, backend: attention.Backend):
    """Returns (the last layer's output [T, hidden] for every token, before the final norm; updated cache)."""
    x = params.embed[batch.token_ids]  # [T, hidden]
    angles = batch.positions[:, None].astype(jnp.float32) * jnp.asarray(cfg.inv_freq())[None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    kvs = []
    for layer, kv_pages in zip(params.layers, cache.kv):
        x, kv_pages = _attention_block(layer, x, cos, sin, kv_pages, batch, cfg, backend)
        x = _mlp_block(layer, x, cfg)
        kvs.append(kv_pages)
    return x, KVCache(kv=tuple(kvs))


def final_logits(params: Params, x, cfg: ModelConfig):
    """x: [N, hidden] last-layer outputs -> logits [N, vocab] float32."""
    x = rms_norm(x, params.final_norm, cfg.rms_norm_eps)
    head = params.embed.T if params.lm_head is None else params.lm_head
    return jnp.dot(x, head, preferred_element_type=jnp.float32)


# transformers' tensor names: linear weights are transposed from HF's [out, in] to [in, out] (the model
# computes `x @ w`). Both loaders (safetensors folders and GGUF files) produce tensors under these names.
_LINEAR = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
           "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
_BIAS = {"bq": "self_attn.q_proj", "bk": "self_attn.k_proj", "bv": "self_attn.v_proj"}
_NORM = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
_QK_NORM = {"q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, dtype, put=None) -> Params:
    """`put(array, field_name)` places each converted array on devices (a sharded load passes its own)."""
    put = put or (lambda a, _name: jax.device_put(a))
    missing = [n for n in hf_shapes(cfg) if n not in tensors]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")

    def get(name, transpose=False, path=""):
        a = np.asarray(tensors[name])
        return put((a.T if transpose else a).astype(dtype, copy=False), path or name)

    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        fields = {k: get(p + v + ".weight", transpose=True, path=k) for k, v in _LINEAR.items()}
        fields |= {k: get(p + v + ".weight", path=k) for k, v in _NORM.items()}
        if cfg.qkv_bias:
            fields |= {k: get(p + v + ".bias", path=k) for k, v in _BIAS.items()}
        if cfg.qk_norm:
            fields |= {k: get(p + v + ".weight", path=k) for k, v in _QK_NORM.items()}
        layers.append(Layer(**fields))
    return Params(
        embed=get("model.embed_tokens.weight", path="embed"),
        layers=tuple(layers),
        final_norm=get("model.norm.weight", path="final_norm"),
        lm_head=get("lm_head.weight", transpose=True, path="lm_head") if not cfg.tie_word_embeddings else None,
    )


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every transformers tensor this family loads for `cfg`, with its shape ([out, in] for linear weights)."""
    hidden, d = cfg.hidden_size, cfg.head_dim
    q, kv, mlp = cfg.num_heads * d, cfg.num_kv_heads * d, cfg.intermediate_size
    linear = {"wq": (q, hidden), "wk": (kv, hidden), "wv": (kv, hidden), "wo": (hidden, q),
              "w_gate": (mlp, hidden), "w_up": (mlp, hidden), "w_down": (hidden, mlp)}
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, hidden), "model.norm.weight": (hidden,)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + v + ".weight": linear[k] for k, v in _LINEAR.items()}
        shapes |= {p + v + ".weight": (hidden,) for v in _NORM.values()}
        if cfg.qkv_bias:
            shapes |= {p + v + ".bias": (linear["w" + k[1]][0],) for k, v in _BIAS.items()}
        if cfg.qk_norm:
            shapes |= {p + v + ".weight": (d,) for v in _QK_NORM.values()}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, hidden)
    return shapes
