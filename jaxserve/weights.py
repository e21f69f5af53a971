"""HF-named tensors -> the model's params pytree.

Both loaders (safetensors folders and GGUF files) produce tensors under transformers' names and layouts,
so this mapping is written once. Linear weights are transposed from HF's [out, in] to [in, out] so the
model computes `x @ w`.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.model import Layer, Params

_LINEAR = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
           "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
_BIAS = {"bq": "self_attn.q_proj", "bk": "self_attn.k_proj", "bv": "self_attn.v_proj"}
_NORM = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
_QK_NORM = {"q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, dtype, put=None) -> Params:
    """`put(array, field_name)` places each converted array on devices (a sharded load passes its own)."""
    put = put or (lambda a, _name: jax.device_put(a))
    missing = [n for n in _expected_names(cfg) if n not in tensors]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")

    def get(name, transpose=False, path=""):
        a = np.asarray(tensors[name])
        return put((a.T if transpose else a).astype(dtype), path or name)

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


def _expected_names(cfg: ModelConfig) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        names += [p + v + ".weight" for v in (*_LINEAR.values(), *_NORM.values())]
        if cfg.qkv_bias:
            names += [p + v + ".bias" for v in _BIAS.values()]
        if cfg.qk_norm:
            names += [p + v + ".weight" for v in _QK_NORM.values()]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def count_params(params: Params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
