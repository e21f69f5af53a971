"""Phi-3 beyond the shared parity cases: longrope's long / short choice per sequence against transformers, tensor
parallelism, and GGUF files as llama.cpp writes them."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

import tiny
from gguf_writer import write_gguf_from_hf
from jaxserve.quantization.qarray import QArray
from jaxserve.weights.loader import load_model
from paged import run_logits
from test_sharding import _compare_logits

ORIGINAL = 16  # original_max_position_embeddings: the tests' sequences sit on both sides of it, or cross it


def _phi3(folder, head_dim=16, **overrides):
    """A tiny Phi-4-mini-like checkpoint (hidden 64): rotary over 3/4 of each head, longrope with distinct factors."""
    pairs = 3 * head_dim // 8  # rotary_dim // 2
    rope = {"rope_type": "longrope", "short_factor": np.linspace(1.0, 2.5, pairs).tolist(),
            "long_factor": np.geomspace(1.2, 11.0, pairs).tolist()}
    return tiny.make_checkpoint(folder, "phi3", partial_rotary_factor=0.75, max_position_embeddings=48,
                                original_max_position_embeddings=ORIGINAL, rope_parameters=rope, head_dim=head_dim,
                                **overrides)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _phi3(tmp_path_factory.mktemp("phi3"))


@pytest.fixture(scope="module")
def hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _full_forward(hf, sequence):
    """transformers' logits [len, vocab] for one sequence in one forward (what its generate() computes at every
    step: it recomputes the cache when a sequence crosses the original context)."""
    with torch.no_grad():
        return hf(torch.tensor([sequence])).logits[0].numpy()


def test_each_sequence_uses_the_factors_of_its_own_length(folder, hf):
    """One step holds a sequence that stays within the original context (6 + 8 tokens: short factors) and one beyond
    it (20 tokens on: long factors). Each matches transformers run on it alone; a batch-wide choice (vLLM's former
    one) or a single set for both would give one of them the other's rotation."""
    loaded = load_model(str(folder), dtype="float32", progress=False)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, loaded.cfg.vocab_size, n).tolist() for n in (6, 20)]
    logits, tokens = run_logits(loaded, prompts, decode_steps=8)
    assert len(prompts[0]) + 8 <= ORIGINAL < len(prompts[1])
    for j, p in enumerate(prompts):
        theirs = _full_forward(hf, p + tokens[j].tolist())[len(p) - 1:len(p) + 8]
        assert np.abs(logits[:, j] - theirs).max() < 1e-4


def test_a_sequence_crossing_the_original_context_keeps_its_cached_rotation(folder, hf):
    """A 12-token prompt decoded past 16 tokens: up to the crossing it matches transformers' generate(); after it,
    the K/V cached with the short factors stay, as in transformers' forward with a kept cache (not its generate(),
    which recomputes them with the long factors)."""
    from transformers import DynamicCache

    loaded = load_model(str(folder), dtype="float32", progress=False)
    prompt = np.random.default_rng(4).integers(3, loaded.cfg.vocab_size, 12).tolist()
    steps = 8
    logits, tokens = run_logits(loaded, [prompt], decode_steps=steps)
    ours = logits[:, 0]  # [steps + 1, vocab]: after the prompt, then after each fed token
    sequence = prompt + tokens[0].tolist()
    kept, cache = [], DynamicCache(config=hf.config)
    with torch.no_grad():
        kept.append(hf(torch.tensor([prompt]), cache=cache, use_cache=True).logits[0, -1].numpy())
        for token in tokens[0, :steps]:
            kept.append(hf(torch.tensor([[int(token)]]), cache=cache, use_cache=True).logits[0, -1].numpy())
    assert np.abs(ours - np.stack(kept)).max() < 1e-4
    # The step whose context first exceeds the original one: len(prompt) + i tokens after step i.
    crossing = ORIGINAL + 1 - len(prompt)
    regenerated = np.stack([_full_forward(hf, sequence[:len(prompt) + i])[-1] for i in range(steps + 1)])
    assert np.abs(ours[:crossing] - regenerated[:crossing]).max() < 1e-4
    assert (np.abs(ours[crossing:] - regenerated[crossing:]).max(axis=-1) > 1e-3).all()


@pytest.mark.parametrize("tp", [2, 4])
def test_tiny_model_logits_and_tokens_match_one_device(tmp_path_factory, tp):
    # 8 query / 4 kv heads split evenly on 2 and 4 devices (fused q/k/v and gate/up regrouped per device); the
    # prompts (24 and 11 tokens, 10 decode steps) use the long factors, and the short ones then the long.
    folder = _phi3(tmp_path_factory.mktemp(f"phi3_tp{tp}"), head_dim=8, num_attention_heads=8, num_key_value_heads=4)
    _compare_logits(load_model(str(folder), dtype="float32", progress=False), tp, 1e-4)


def test_gguf_gives_the_safetensors_config_and_logits(folder, tmp_path):
    """llama.cpp's phi3 layout: fused attn_qkv and ffn_up (gate and up), no head size, the rotary dims as the rope
    dimension count, longrope as two factor tensors and an attention factor."""
    path = tmp_path / "phi3.gguf"
    write_gguf_from_hf(folder, path)
    ref, ours = (load_model(str(f), dtype="float32", progress=False) for f in (folder, path))
    assert (ours.cfg.head_dim, ours.cfg.rotary_dim, ours.cfg.sliding_window) == (16, 12, None)
    assert ours.cfg.rope_scaling.original_max_position_embeddings == ORIGINAL
    np.testing.assert_allclose(ours.cfg.inv_freq(long=True), ref.cfg.inv_freq(long=True), rtol=1e-6)
    np.testing.assert_allclose(ours.cfg.inv_freq(long=False), ref.cfg.inv_freq(long=False), rtol=1e-6)
    assert ours.cfg.rope_scaling.attention_factor == pytest.approx(ref.cfg.rope_scaling.attention_factor)
    prompts = [list(range(5, 11)), list(range(40, 60))]  # within and beyond the original context
    ref_logits, ref_tokens = run_logits(ref, prompts, decode_steps=8)
    logits, _ = run_logits(ours, prompts, decode_steps=8, feed=ref_tokens)
    assert np.abs(logits - ref_logits).max() < 1e-4


def test_quantized_fused_gguf_tensors_split_as_dequantized_ones(folder, tmp_path):
    """Q8_0 matrices kept as stored (--quantization gguf): the fused tensors' QArrays are split by rows into q, k, v
    and gate, up, and compute what the same file dequantized does."""
    path = tmp_path / "phi3_q8.gguf"
    write_gguf_from_hf(folder, path, lambda name, shape: QT.Q8_0)
    kept = load_model(str(path), dtype="float32", quantization="gguf", progress=False)
    assert isinstance(kept.params.layers[0].wqkv, QArray) and isinstance(kept.params.layers[0].w_gate_up, QArray)
    dequantized = load_model(str(path), dtype="float32", quantization="none", progress=False)
    prompts = [list(range(5, 11)), list(range(40, 60))]
    ref_logits, ref_tokens = run_logits(dequantized, prompts, decode_steps=8)
    logits, _ = run_logits(kept, prompts, decode_steps=8, feed=ref_tokens)
    assert np.abs(logits - ref_logits).max() < 1e-5
