"""Logits parity with transformers' PyTorch models on tiny random checkpoints, through the paged KV cache."""

import numpy as np
import pytest
import torch

import tiny
from jaxserve import models
from jaxserve.models.config import ModelConfig
from jaxserve.weights.loader import load_model
from paged import run_logits

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
GEMMA = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, query_pre_attn_scalar=24, sliding_window=6,
             layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True)
CASES = {
    "llama": ("llama", {}),
    "llama3_rope_scaling": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "llama_tied_mha": ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    "mistral": ("mistral", {"sliding_window": None}),
    "mistral_sliding_window": ("mistral", {"sliding_window": 12}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    # Mixtures of experts, 8 experts routed unevenly by the random router; Qwen3-MoE with a dense first layer
    # (decoder_sparse_step 2) or a dense last one (mlp_only_layers). Top 5-6 of 8 rather than top 2: in bfloat16 a
    # near-tie between the k-th and (k+1)-th expert flips (transformers' own bfloat16 against its float32 too, by
    # up to 1.3 here), and with many experts chosen a flip swaps only a lightly weighted one. Top 2, in float32:
    # tests/test_moe_parity.py.
    "mixtral": ("mixtral", {"num_local_experts": 8, "num_experts_per_tok": 6, "intermediate_size": 32}),
    "qwen3_moe": ("qwen3_moe", {"num_experts": 8, "num_experts_per_tok": 6, "moe_intermediate_size": 32,
                                "decoder_sparse_step": 2, "norm_topk_prob": True}),
    "qwen3_moe_unnormalized": ("qwen3_moe", {"num_experts": 8, "num_experts_per_tok": 5, "moe_intermediate_size": 32,
                                             "mlp_only_layers": [1], "norm_topk_prob": False}),
    "phi3": ("phi3", {}),
    # Phi-4-mini's shape: rotary over 12 of 16 dims, longrope factors (6 each, all distinct) and its attention factor;
    # every sequence here is longer than the original context (16), so all use the long factors (tests/test_phi3.py
    # runs sequences on both sides of it).
    "phi3_partial_longrope": ("phi3", {"partial_rotary_factor": 0.75, "max_position_embeddings": 48,
                                       "original_max_position_embeddings": 16, "rope_parameters": {
                                           "rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                                           "long_factor": [1.2, 1.9, 3.1, 4.7, 7.3, 11.0]}}),
    # Gemma: odd head counts, a window (6) shorter than the prompts, sliding and full layers, soft caps (Gemma 2),
    # Gemma 3's own rope base for sliding layers and linear scaling on full ones, query_pre_attn_scalar != head_dim.
    "gemma2": ("gemma2", dict(GEMMA, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3": ("gemma3_text", dict(GEMMA, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}})),
}
PROMPT_LENS = (23, 31)  # two ragged sequences in one batch, ending mid-page
DECODE_STEPS = 10


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    model_type, overrides = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    return tiny.make_checkpoint(folder, model_type, **overrides)


def test_the_family_names_transformers_tensors_and_shapes(checkpoint):
    """hf_shapes (what loading expects, what tiny checkpoints and `jaxserve check`'s abstract weights are built
    from) against the state dict of transformers' own model for the same config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(checkpoint)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_config)
    want = {k: tuple(v.shape) for k, v in hf.state_dict().items()
            if not (hf_config.tie_word_embeddings and k == "lm_head.weight")}
    cfg = ModelConfig.from_hf(hf_config.to_dict())
    assert models.family(cfg.model_type).hf_shapes(cfg) == want


def _hf_logits(folder, sequences, dtype):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    with torch.no_grad():
        return [hf(torch.tensor([s])).logits[0].float().numpy() for s in sequences]


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 0.35)])
def test_prefill_and_decode_logits_match_transformers(checkpoint, dtype, tol):
    # bfloat16 tolerance: logits here have magnitude ~10, and bf16 keeps 8 mantissa bits (relative error
    # ~4e-3 per op), accumulated over 2 layers; the greedy tokens must still match where the top-2 gap is clear.
    loaded = load_model(str(checkpoint), dtype=dtype, progress=False)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, loaded.cfg.vocab_size, n).tolist() for n in PROMPT_LENS]
    logits, tokens = run_logits(loaded, prompts, DECODE_STEPS)
    full = [p + t.tolist() for p, t in zip(prompts, tokens)]
    ref = _hf_logits(checkpoint, full, getattr(torch, dtype))
    for j, p in enumerate(prompts):
        ours = logits[:, j]  # [steps + 1, vocab]: logits after the prompt, then after each fed token
        theirs = ref[j][len(p) - 1: len(p) + DECODE_STEPS]
        assert np.abs(ours - theirs).max() < tol
        if dtype == "float32":
            assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_greedy_tokens_match_transformers_generate(checkpoint):
    from transformers import AutoModelForCausalLM

    loaded = load_model(str(checkpoint), dtype="float32", progress=False)
    prompt = np.random.default_rng(2).integers(3, loaded.cfg.vocab_size, 21).tolist()
    _, tokens = run_logits(loaded, [prompt], DECODE_STEPS)
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=DECODE_STEPS + 1, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    assert tokens[0].tolist() == out[0, len(prompt):].tolist()
