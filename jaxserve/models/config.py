"""Model configuration: one frozen dataclass for every family (Llama, Gemma, Phi-3, mixtures of experts).

Built from a transformers-style `config.json` dict. GGUF files are first translated into such a dict by
`weights/gguf_file.py`, so this is the only place that interprets architecture hyper-parameters.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxserve.models import FAMILIES

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling: "linear" (positions divided by `factor`), "llama3" (Llama 3.1 / 3.2) or
    "longrope" (Phi-3 / Phi-4: per-frequency divisors, `short_factor` within the original context and
    `long_factor` beyond it, cos and sin multiplied by `attention_factor`). Other rope types are rejected at load."""

    rope_type: str
    factor: float
    original_max_position_embeddings: int = 0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    rope_scaling: RopeScaling | None = None
    partial_rotary_factor: float = 1.0  # rotary over the first head_dim * this dims of each head (Phi-4-mini: 0.75)
    hidden_act: str = "silu"  # the gated MLP's activation: silu (SwiGLU) or gelu_pytorch_tanh (Gemma's GeGLU)
    # Gemma 2 / 3: attention scale query_pre_attn_scalar ** -0.5 (else head_dim ** -0.5), tanh soft caps on the
    # attention scores and the final logits, and per-layer kinds ("sliding_attention" | "full_attention") where
    # only sliding layers use `sliding_window` and, in Gemma 3, their own rope base without scaling.
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    layer_types: tuple[str, ...] | None = None
    local_rope_theta: float | None = None
    # Mixtures of experts (Mixtral, Qwen3-MoE): num_experts > 0. Each token goes to its num_experts_per_tok best
    # experts by the router's softmax, their weights renormalized to sum 1 where norm_topk_prob; `moe_layers`
    # says which layers have experts (the others a dense MLP of intermediate_size).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: tuple[bool, ...] = ()
    # The fused q/k/v and gate/up weights hold their output columns in this many groups, one per device of the
    # model axis when they are split over it (each group: that device's q, k, v heads; its gate, up columns),
    # else 1. Set where the weights are placed (sharding.placed).
    qkv_groups: int = 1
    mlp_groups: int = 1

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        if hf.get("model_type") == "gemma3" and "text_config" in hf:  # Gemma 3 with vision: its text decoder
            hf = {**hf["text_config"], "model_type": "gemma3_text"}
        model_type = hf.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = hf.get("architectures") or []
            raise ValueError(
                f"unsupported model_type {model_type!r} (architectures {archs}); "
                f"jaxserve supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        num_layers = hf["num_hidden_layers"]
        # transformers 5 nests rope settings in `rope_parameters` (per layer kind for Gemma 3); older files keep them
        # at top level (Gemma 3: rope_theta for full layers, rope_local_base_freq for sliding ones).
        rope = dict(hf.get("rope_parameters") or {})
        local_rope = rope.pop("sliding_attention", None)
        rope = rope.pop("full_attention", rope)
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        legacy_scaling = hf.get("rope_scaling") or {}
        scaling = rope if rope.get("rope_type", "default") != "default" else legacy_scaling
        local_theta = (local_rope or {}).get("rope_theta", hf.get("rope_local_base_freq"))
        sliding = hf.get("sliding_window")
        if model_type in ("qwen2", "qwen3_moe") and not hf.get("use_sliding_window", False):
            sliding = None  # Qwen2 and Qwen3-MoE configs carry a window value but disable it by default.
        num_experts = hf.get("num_local_experts") or hf.get("num_experts") or 0
        sparse_step = hf.get("decoder_sparse_step") or 1
        dense_only = set(hf.get("mlp_only_layers") or ())
        max_positions = hf.get("max_position_embeddings", 4096)
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hidden // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", model_type in GEMMA_TYPES)),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
            sliding_window=sliding,
            rope_scaling=_rope_scaling(scaling, hf, max_positions),
            partial_rotary_factor=float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))),
            hidden_act=hf.get("hidden_activation") or hf.get("hidden_act") or "silu",
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
            attn_logit_softcapping=hf.get("attn_logit_softcapping"),
            final_logit_softcapping=hf.get("final_logit_softcapping"),
            layer_types=_layer_types(hf, model_type, num_layers),
            local_rope_theta=float(local_theta) if local_theta is not None else None,
            num_experts=num_experts,
            num_experts_per_tok=hf.get("num_experts_per_tok", 0) if num_experts else 0,
            moe_intermediate_size=hf.get("moe_intermediate_size") or hf["intermediate_size"] if num_experts else 0,
            norm_topk_prob=bool(hf.get("norm_topk_prob", model_type == "mixtral")),
            moe_layers=tuple(bool(num_experts) and i not in dense_only and (i + 1) % sparse_step == 0
                             for i in range(num_layers)),
        )

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def sm_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_window(self, i: int) -> int | None:
        """Layer i's sliding window (None: it attends to the whole context)."""
        if self.layer_types is None or self.layer_types[i] == "sliding_attention":
            return self.sliding_window
        return None

    def ringed(self, i: int) -> bool:
        """Whether layer i keeps its K/V in a per-sequence ring of pages instead of the shared page pool: a sliding
        layer of a model that also has full layers (Gemma 2 / 3), so a long context costs pool pages for the full
        layers only (base.ring_pages). Models whose layers all slide (Mistral) keep the pool."""
        return self.layer_types is not None and "full_attention" in self.layer_types and \
            self.layer_window(i) is not None

    def layer_inv_freq(self, i: int, long: bool = False) -> np.ndarray:
        """Layer i's rotary inverse frequencies: Gemma 3's sliding layers use their own base, unscaled."""
        if self.local_rope_theta is not None and self.layer_window(i) is not None:
            return _default_inv_freq(self.local_rope_theta, self.rotary_dim).astype(np.float32)
        return self.inv_freq(long)

    def inv_freq(self, long: bool = False) -> np.ndarray:
        """Rotary inverse frequencies [rotary_dim // 2] with the scaling applied (longrope: `long` picks the
        factors beyond the original context)."""
        inv = _default_inv_freq(self.rope_theta, self.rotary_dim)
        s = self.rope_scaling
        if s is None:
            return inv.astype(np.float32)
        if s.rope_type == "linear":
            return (inv / s.factor).astype(np.float32)
        if s.rope_type == "longrope":
            return (inv / np.asarray(s.long_factor if long else s.short_factor, np.float64)).astype(np.float32)
        # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        mid = (1 - smooth) * inv / s.factor + smooth * inv
        out = np.where(wavelen > low_wavelen, inv / s.factor, np.where(wavelen < high_wavelen, inv, mid))
        return out.astype(np.float32)


GEMMA_TYPES = ("gemma2", "gemma3_text")


def _default_inv_freq(theta: float, dim: int) -> np.ndarray:
    """Unscaled rotary inverse frequencies [dim // 2], float64."""
    return 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))


def _layer_types(hf: dict, model_type: str, num_layers: int) -> tuple[str, ...] | None:
    """Gemma's per-layer attention kinds: `layer_types` where written, else Gemma 2's alternation (sliding first)
    or Gemma 3's `sliding_window_pattern` (every n-th layer full)."""
    if model_type not in GEMMA_TYPES:
        return None
    if hf.get("layer_types"):
        return tuple(hf["layer_types"])
    n = 2 if model_type == "gemma2" else hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
    return tuple("sliding_attention" if (i + 1) % n else "full_attention" for i in range(num_layers))


def _rope_scaling(scaling: dict, hf: dict, max_positions: int) -> RopeScaling | None:
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling("linear", float(scaling["factor"]))
    if kind == "llama3":
        return RopeScaling("llama3", float(scaling["factor"]),
                           int(scaling["original_max_position_embeddings"]),
                           low_freq_factor=float(scaling["low_freq_factor"]),
                           high_freq_factor=float(scaling["high_freq_factor"]))
    if kind == "longrope" or (kind in ("su", "yarn") and hf.get("model_type") == "phi3"):  # Phi-3's older names
        # Phi-3 keeps the original context at top level, and transformers prefers that to the rope parameters' copy;
        # the scale is how far max_position_embeddings extends it.
        original = int(hf.get("original_max_position_embeddings") or scaling["original_max_position_embeddings"])
        factor = float(scaling.get("factor") or max_positions / original)
        attention = scaling.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        return RopeScaling("longrope", factor, original, short_factor=tuple(map(float, scaling["short_factor"])),
                           long_factor=tuple(map(float, scaling["long_factor"])), attention_factor=float(attention))
    raise ValueError(f"unsupported rope scaling {kind!r}; jaxserve supports 'default', 'linear', 'llama3' and "
                     "'longrope'")
