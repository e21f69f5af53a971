"""Model configuration: one frozen dataclass for the whole Llama family.

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
    """llama3-style frequency scaling (Llama 3.1 / 3.2). Other rope types are rejected at load time."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


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
    # The fused q/k/v and gate/up weights hold their output columns in this many groups, one per device of the
    # model axis when they are split over it (each group: that device's q, k, v heads; its gate, up columns),
    # else 1. Set where the weights are placed (sharding.placed).
    qkv_groups: int = 1
    mlp_groups: int = 1

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        model_type = hf.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = hf.get("architectures") or []
            raise ValueError(
                f"unsupported model_type {model_type!r} (architectures {archs}); "
                f"jaxserve supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        # transformers 5 nests rope settings in `rope_parameters`; older files keep them at top level.
        rope = dict(hf.get("rope_parameters") or {})
        legacy_scaling = hf.get("rope_scaling") or {}
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = rope if rope.get("rope_type", "default") != "default" else legacy_scaling
        sliding = hf.get("sliding_window")
        if model_type == "qwen2" and not hf.get("use_sliding_window", False):
            sliding = None  # Qwen2 configs carry a window value but disable it by default.
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hidden // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=sliding,
            rope_scaling=_rope_scaling(scaling),
        )

    def inv_freq(self) -> np.ndarray:
        """Rotary inverse frequencies [head_dim // 2], with llama3 scaling applied when configured."""
        inv = 1.0 / (self.rope_theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim))
        s = self.rope_scaling
        if s is None:
            return inv.astype(np.float32)
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


def _rope_scaling(scaling: dict) -> RopeScaling | None:
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling {kind!r}; jaxserve supports 'default' and 'llama3'")
    return RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )
