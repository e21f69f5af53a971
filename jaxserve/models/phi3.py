"""Phi-3 and Phi-4-mini: a Llama decoder whose checkpoints fuse q/k/v (`self_attn.qkv_proj`) and gate/up
(`mlp.gate_up_proj`), with partial rotary (Phi-4-mini rotates the first 3/4 of each head) and longrope scaling.

The decoder is llama.py's, unchanged: its wqkv / w_gate_up already compute with fused columns. Loading splits the
fused tensors back into Llama's parts (q, k, v; gate, up) and hands them to llama.params_from_hf, so that
sharding.param_put regroups them per device exactly as for Llama. Partial rotary and longrope are ModelConfig's and
base.rope's (rotary_dim, the long / short inverse frequencies, the attention factor on cos and sin).

Longrope: long or short factors. The model was trained with `short_factor` up to original_max_position_embeddings
and `long_factor` beyond, and implementations choose differently when:
- transformers picks one set per forward call, long when max(position_ids) + 1 > original_max_position_embeddings,
  and its generate() drops the KV cache and recomputes the whole sequence at the step that first crosses that
  length, so every token's K is always rotated with the set of the sequence's current length;
- vLLM used to pick long for the whole batch when any position exceeded the original context (so a sequence's
  output depended on its batch mates, and K cached before the switch kept the short rotation); it now uses long
  for every token whenever max_model_len exceeds the original context, so the cache never goes stale;
- llama.cpp likewise picks once, by the configured context per sequence (n_ctx_seq > n_ctx_orig).
We follow transformers' rule per sequence (base.rope): a token uses the long set when its sequence's context
after this step (kv_lens) exceeds original_max_position_embeddings. That matches transformers exactly for every
sequence that stays on one side of the original context, and for a prompt beyond it prefilled in one chunk (then
decoded), whatever else shares the step; a sequence never depends on its batch mates. Where a sequence crosses the
original context while its earlier K/V sit in the cache (decode crossing it, or a long prompt prefilled in several
chunks), we keep those K rotated with the short set, as transformers' forward with a kept cache does (tests/
test_phi3.py checks that), whereas transformers' generate() would recompute them with the long set: the engine
would have to recompute the sequence's cache at the crossing to match that, which it does not do. Pages shared
through the prefix cache carry the rotation of the request that computed them, and a step that feeds several tokens
of one sequence (speculative verification) picks by its end. Why this rule rather than vLLM's: short sequences keep
the short factors they were trained with (vLLM serving a 128k Phi-3 gives every prompt the long ones), and the
outputs are transformers' wherever no crossing happens.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from jaxserve.models import llama
from jaxserve.models.config import ModelConfig
from jaxserve.quantization.qarray import QArray

# The family's decoder is Llama's.
Layer, Params, hidden_states, final_logits = llama.Layer, llama.Params, llama.hidden_states, llama.final_logits

# Phi-3's fused tensors and the Llama tensors they hold, in row order ([out, in]: the parts stacked on out).
_FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def _parts(cfg: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """Each Llama weight held in a fused Phi-3 weight -> (the fused weight's name, first row, end row)."""
    shapes = llama.hf_shapes(cfg)
    parts = {}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        for fused, names in _FUSED.items():
            start = 0
            for name in names:
                rows = shapes[p + name + ".weight"][0]
                parts[p + name + ".weight"] = (p + fused + ".weight", start, start + rows)
                start += rows
    return parts


class _LlamaNames(Mapping):
    """A Phi-3 checkpoint's tensors under Llama's names, the fused ones split by rows when read (a QArray's values,
    scales and offsets alike: its groups run along the input axis), so a lazy checkpoint stays lazy."""

    def __init__(self, tensors: Mapping, cfg: ModelConfig):
        self._tensors, self._parts = tensors, _parts(cfg)
        fused = {source for source, _, _ in self._parts.values()}
        self._names = dict.fromkeys([n for n in tensors if n not in fused]
                                    + [n for n, (source, _, _) in self._parts.items() if source in tensors])

    def __getitem__(self, name: str):
        if name in self._tensors or name not in self._parts:  # a part stored apart (some phi3 GGUF files' q, k, v)
            return self._tensors[name]
        source, start, stop = self._parts[name]
        return jax.tree.map(lambda a: a[start:stop], self._tensors[source])

    def __contains__(self, name) -> bool:
        return name in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def params_from_hf(tensors: Mapping[str, np.ndarray | QArray], cfg: ModelConfig, dtype, put) -> Params:
    """As llama.params_from_hf, over Phi-3's tensor names."""
    return llama.params_from_hf(_LlamaNames(tensors, cfg), cfg, dtype, put)


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every transformers tensor this family loads for `cfg`, with its shape ([out, in] for linear weights)."""
    shapes = llama.hf_shapes(cfg)
    for name, (fused, _, stop) in _parts(cfg).items():
        _, columns = shapes.pop(name)
        shapes[fused] = (stop, columns)  # the last part's end row is the fused weight's row count
    return shapes
