"""Model families, by transformers' `model_type`.

A family is one file: its params pytree with the logical axes of each weight, the transformers tensor names it
loads (`params_from_hf`), and its forward pass (`hidden_states`, `final_logits`; `forward` below chains them) over
the shared types of base.py. Adding one (Gemma, a mixture of experts) is a new file here and its lines in FAMILIES.
"""

from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES = {  # model_type -> the module under jaxserve.models that implements it
    "llama": "llama",
    "mistral": "llama",  # Llama with an optional sliding window
    "qwen2": "llama",  # q/k/v biases
    "qwen3": "llama",  # per-head RMSNorm on q and k
    "phi3": "phi3",  # Phi-3 and Phi-4-mini: fused qkv_proj / gate_up_proj, partial rotary, longrope
    "gemma2": "gemma",
    "gemma3_text": "gemma",  # also a Gemma 3 ("gemma3") checkpoint's text decoder
    "mixtral": "moe",
    "qwen3_moe": "moe",
}


def family(model_type: str) -> ModuleType:
    return importlib.import_module(f"jaxserve.models.{FAMILIES[model_type]}")


def forward(params, cache, batch, cfg, backend):
    """One step of any family: (logits [S, vocab] float32 for each sequence's `logits_indices` token, the updated
    cache). The engine calls hidden_states and final_logits apart (it keeps every token's hidden state)."""
    f = family(cfg.model_type)
    x, cache = f.hidden_states(params, cache, batch, cfg, backend)
    return f.final_logits(params, x[batch.logits_indices], cfg), cache
