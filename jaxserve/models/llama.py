"""The Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM2): its params pytree, the transformers tensors it loads
from, and its decoder as pure functions.

One forward serves every step of the engine: a flat batch of tokens from many sequences (prefill chunks and
single decode tokens mixed), their K/V written into the paged cache, attention read back from it. The model
does not know which attention backend runs: `attention.py` is the one dispatch point.

Layers are a Python tuple, unrolled under jit: measured ~3x faster per step on CPU than `lax.scan` over
stacked layers (design.md). Each layer is a jit of its own (`_decoder_layer`), so a step program traces and
lowers one layer instead of every layer; XLA inlines the calls, and the optimized program is the same.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.models import attention
from jaxserve.models.config import ModelConfig
from jaxserve.models.base import Batch, KVCache, apply_rope, rms_norm, rope, tensor_reader
from jaxserve.quantization.qarray import QArray, linear, linear_rows, take_rows


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Layer:
    # The four matrices may be QArrays (jaxserve.quantization), grouped along their input axis.
    attn_norm: jax.Array  # [hidden]
    wqkv: jax.Array  # [hidden, (q_heads + 2 * kv_heads) * head_dim], in cfg.qkv_groups groups of (q, k, v) heads
    wo: jax.Array  # [q_heads * head_dim, hidden]
    mlp_norm: jax.Array  # [hidden]
    w_gate_up: jax.Array  # [hidden, 2 * intermediate], in cfg.mlp_groups groups of (gate, up) columns
    w_down: jax.Array  # [intermediate, hidden]
    bqkv: jax.Array | None = None  # [(q_heads + 2 * kv_heads) * head_dim], grouped as wqkv  (Qwen2)
    q_norm: jax.Array | None = None  # [head_dim]  (Qwen3)
    k_norm: jax.Array | None = None  # [head_dim]  (Qwen3)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Params:
    embed: jax.Array | QArray  # [vocab, hidden]; a QArray is grouped along hidden
    layers: tuple[Layer, ...]
    final_norm: jax.Array  # [hidden]
    lm_head: jax.Array | QArray | None  # [hidden, vocab]; None when tied to `embed`


def attend(layer, h, cos, sin, kv_pages, batch: Batch, cfg: ModelConfig, backend: attention.Backend,
           window: int | None, norm=rms_norm):
    """Self-attention of normed inputs h [T, hidden] through the paged cache -> (o_proj output [T, hidden], kv_pages).
    `layer` has wqkv, wo (and bqkv, q_norm, k_norm where cfg says); norm: the family's RMSNorm, for q and k."""
    t = h.shape[0]
    qkv = linear(h, layer.wqkv)
    if cfg.qkv_bias:
        qkv = qkv + layer.bqkv
    g, hq, hkv = cfg.qkv_groups, cfg.num_heads // cfg.qkv_groups, cfg.num_kv_heads // cfg.qkv_groups
    qkv = qkv.reshape(t, g, hq + 2 * hkv, cfg.head_dim)  # each group one device's heads: no data moves
    q = qkv[:, :, :hq].reshape(t, cfg.num_heads, cfg.head_dim)
    k = qkv[:, :, hq:hq + hkv].reshape(t, cfg.num_kv_heads, cfg.head_dim)
    v = qkv[:, :, hq + hkv:].reshape(t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = norm(q, layer.q_norm, cfg.rms_norm_eps)
        k = norm(k, layer.k_norm, cfg.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out, kv_pages = attention.paged_attention(q, k, v, kv_pages, batch, cfg, backend, window)
    return linear(out.reshape(t, -1), layer.wo), kv_pages


def _attention_block(layer: Layer, x, cos, sin, kv_pages, batch: Batch, cfg: ModelConfig,
                     backend: attention.Backend):
    h = rms_norm(x, layer.attn_norm, cfg.rms_norm_eps)
    out, kv_pages = attend(layer, h, cos, sin, kv_pages, batch, cfg, backend, cfg.sliding_window)
    return x + out, kv_pages


ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True)}


def gated_mlp(layer, h, cfg: ModelConfig):
    """act(h @ gate) * (h @ up) @ down for normed inputs h [T, hidden]; `layer` has w_gate_up and w_down."""
    t = h.shape[0]
    gate_up = linear(h, layer.w_gate_up).reshape(t, cfg.mlp_groups, 2, -1)  # [T, groups, gate/up, columns]
    gate = gate_up[:, :, 0].reshape(t, -1)
    up = gate_up[:, :, 1].reshape(t, -1)
    return linear(ACTIVATIONS[cfg.hidden_act](gate) * up, layer.w_down)


def _mlp_block(layer: Layer, x, cfg: ModelConfig):
    return x + gated_mlp(layer, rms_norm(x, layer.mlp_norm, cfg.rms_norm_eps), cfg)


def hidden_states(params: Params, cache: KVCache, batch: Batch, cfg: ModelConfig, backend: attention.Backend,
                  decoder_layer=None):
    """Returns (the last layer's output [T, hidden] for every token, before the final norm; updated cache).
    decoder_layer: another family's layer function with _decoder_layer's signature (moe.py's)."""
    decoder_layer = decoder_layer or _decoder_layer
    x = take_rows(params.embed, batch.token_ids, params.final_norm.dtype)  # [T, hidden]
    cos, sin = rope(cfg, batch)  # [T, rotary_dim // 2]
    kvs = []
    for layer, kv_pages in zip(params.layers, cache.kv):
        x, kv_pages = decoder_layer(layer, x, cos, sin, kv_pages, batch, cfg, backend)
        kvs.append(kv_pages)
    return x, KVCache(kv=tuple(kvs))


@functools.partial(jax.jit, static_argnames=("cfg", "backend"))
def _decoder_layer(layer: Layer, x, cos, sin, kv_pages, batch: Batch, cfg: ModelConfig, backend: attention.Backend):
    """One decoder layer: x [T, hidden] -> x, and its kv_pages with this step's K/V written. Every layer has the same
    shapes, so this is traced and lowered once per step program, not once per layer."""
    x, kv_pages = _attention_block(layer, x, cos, sin, kv_pages, batch, cfg, backend)
    return _mlp_block(layer, x, cfg), kv_pages


def final_logits(params: Params, x, cfg: ModelConfig):
    """x: [N, hidden] last-layer outputs -> logits [N, vocab] float32."""
    return head_logits(params, rms_norm(x, params.final_norm, cfg.rms_norm_eps))


def head_logits(params: Params, x):
    """x: [N, hidden] normed -> logits [N, vocab] float32, by the LM head or the tied embedding."""
    if params.lm_head is None:
        return linear_rows(x, params.embed, out_dtype=jnp.float32)
    return linear(x, params.lm_head, out_dtype=jnp.float32)


# transformers' tensor names: linear weights are transposed from HF's [out, in] to [in, out] (the model
# computes `x @ w`). Both loaders (safetensors folders and GGUF files) produce tensors under these names. A fused
# field is made of several tensors, concatenated along the output axis by `put` (which groups them per device).
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # wqkv's parts (bqkv's, of their biases)
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")  # w_gate_up's parts
_NORM = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
_QK_NORM = {"q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}


def params_from_hf(tensors: Mapping[str, np.ndarray | QArray], cfg: ModelConfig, dtype, put, *, norms=None,
                   layer_type=Layer, expected=None, mlp=None) -> Params:
    """Tensors are float arrays or QArrays (a GGUF file's quantized types, grouped along their last axis), under
    transformers' names and [out, in] layout. `put(array, field_name)` places each converted array on devices
    (parallel.sharding.param_put: it also quantizes where asked); fused fields pass a tuple of parts in order
    (q, k, v / gate, up), which put concatenates on the last axis. For families that differ from Llama only in
    some layers' fields: norms and layer_type, another family's norms (as hf_shapes) and layer dataclass (Gemma);
    expected, the tensor names to require (default: hf_shapes); mlp(i, prefix, read), layer i's MLP fields
    where they are not Llama's dense ones (a mixture of experts' layers), else None."""
    norms = norms or _NORM
    convert = tensor_reader(tensors, hf_shapes(cfg, norms) if expected is None else expected, dtype)

    def get(name, transpose=False, path=""):
        return put(convert(name, transpose), path or name)

    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        fields = {"wo": get(p + "self_attn.o_proj.weight", transpose=True, path="wo")}
        fields["wqkv"] = put(tuple(convert(p + v + ".weight", transpose=True) for v in _QKV), "wqkv")
        fields |= {k: get(p + v + ".weight", path=k) for k, v in norms.items()}
        if cfg.qkv_bias:
            fields["bqkv"] = put(tuple(convert(p + v + ".bias") for v in _QKV), "bqkv")
        if cfg.qk_norm:
            fields |= {k: get(p + v + ".weight", path=k) for k, v in _QK_NORM.items()}
        mlp_fields = mlp(i, p, convert) if mlp else None
        if mlp_fields is None:
            gate_up = tuple(convert(p + v + ".weight", transpose=True) for v in _GATE_UP)
            mlp_fields = {"w_down": get(p + "mlp.down_proj.weight", transpose=True, path="w_down"),
                          "w_gate_up": put(gate_up, "w_gate_up")}
        layers.append(layer_type(**fields, **mlp_fields))
    return Params(
        embed=get("model.embed_tokens.weight", path="embed"),
        layers=tuple(layers),
        final_norm=get("model.norm.weight", path="final_norm"),
        lm_head=get("lm_head.weight", transpose=True, path="lm_head") if not cfg.tie_word_embeddings else None,
    )


def hf_shapes(cfg: ModelConfig, norms=None) -> dict[str, tuple[int, ...]]:
    """Every transformers tensor this family loads for `cfg`, with its shape ([out, in] for linear weights).
    norms: each layer's norm fields -> tensor names, where a family (Gemma) has others than Llama's two."""
    hidden, d = cfg.hidden_size, cfg.head_dim
    q, kv, mlp = cfg.num_heads * d, cfg.num_kv_heads * d, cfg.intermediate_size
    linear = {"self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
              "self_attn.o_proj": (hidden, q), "mlp.gate_proj": (mlp, hidden), "mlp.up_proj": (mlp, hidden),
              "mlp.down_proj": (hidden, mlp)}
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, hidden), "model.norm.weight": (hidden,)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + name + ".weight": shape for name, shape in linear.items()}
        shapes |= {p + v + ".weight": (hidden,) for v in (norms or _NORM).values()}
        if cfg.qkv_bias:
            shapes |= {p + v + ".bias": (linear[v][0],) for v in _QKV}
        if cfg.qk_norm:
            shapes |= {p + v + ".weight": (d,) for v in _QK_NORM.values()}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, hidden)
    return shapes
