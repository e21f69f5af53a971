"""Mixtures of experts against transformers: top-2 routing in float32 (test_model_parity.py's MoE cases choose more
experts, for bfloat16), and the per-expert tensor names that real checkpoints and save_pretrained write."""

import shutil

import jax
import numpy as np
import pytest
import torch

import tiny
from jaxserve.weights.loader import load_model
from paged import run_logits
from test_model_parity import DECODE_STEPS, PROMPT_LENS, _hf_logits

TOP2 = {
    "mixtral": ("mixtral", {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 32}),
    "qwen3_moe": ("qwen3_moe", {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                "decoder_sparse_step": 2, "norm_topk_prob": False}),
}


@pytest.mark.parametrize("case", sorted(TOP2))
def test_top2_logits_and_greedy_tokens_match_transformers(tmp_path, case):
    model_type, overrides = TOP2[case]
    folder = tiny.make_checkpoint(tmp_path, model_type, **overrides)
    loaded = load_model(str(folder), dtype="float32", progress=False)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, loaded.cfg.vocab_size, n).tolist() for n in PROMPT_LENS]
    logits, tokens = run_logits(loaded, prompts, DECODE_STEPS)
    ref = _hf_logits(folder, [p + t.tolist() for p, t in zip(prompts, tokens)], torch.float32)
    for j, p in enumerate(prompts):
        theirs = ref[j][len(p) - 1: len(p) + DECODE_STEPS]
        assert np.abs(logits[:, j] - theirs).max() < 1e-4
        assert (logits[:, j].argmax(-1) == theirs.argmax(-1)).all()


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_on_disk_per_expert_tensors_load_as_the_fused_ones(tmp_path, model_type):
    """Real checkpoints, and transformers' save_pretrained of a model it built, write one tensor per expert (Mixtral
    under block_sparse_moe.experts.E.w1/w2/w3, Qwen3-MoE under mlp.experts.E.gate_proj/...); tiny checkpoints, and
    save_pretrained of a model loaded from them, hold the in-memory fused 3-D ones. Both load to the same params."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    overrides = {"num_local_experts": 4, "num_experts_per_tok": 2} if model_type == "mixtral" else \
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
    fused = tiny.make_checkpoint(tmp_path / "fused", model_type, **overrides)
    built = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(fused))
    built.load_state_dict(AutoModelForCausalLM.from_pretrained(fused, dtype=torch.float32).state_dict())
    built.save_pretrained(tmp_path / "disk")
    for f in fused.iterdir():  # the tokenizer
        if not (tmp_path / "disk" / f.name).exists():
            shutil.copy(f, tmp_path / "disk")
    with safe_open(tmp_path / "disk" / "model.safetensors", "np") as f:
        names = set(f.keys())
    block, gate = ("block_sparse_moe", "w1") if model_type == "mixtral" else ("mlp", "gate_proj")
    assert f"model.layers.1.{block}.experts.3.{gate}.weight" in names and f"model.layers.1.{block}.gate.weight" in names
    assert not any("gate_up_proj" in n for n in names)
    a = load_model(str(fused), dtype="float32", progress=False).params
    b = load_model(str(tmp_path / "disk"), dtype="float32", progress=False).params
    assert a.layers[1].w_gate_exps.shape == (4, 64, a.layers[1].w_gate_exps.shape[2])
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
