"""Gemma 2 / 3 beyond the parity cases of test_model_parity.py: both config spellings, and tensor parallelism."""

import numpy as np
import pytest

import tiny
from jaxserve.models.config import ModelConfig
from jaxserve.parallel.sharding import make_mesh, shard_params
from jaxserve.weights.loader import load_model
from paged import run_logits

# Gemma-3-27B-it's text settings as transformers 4 wrote them (top-level rope_theta / rope_local_base_freq /
# rope_scaling / sliding_window_pattern), and as transformers 5 writes them (rope_parameters per layer kind,
# layer_types).
GEMMA3_V4 = dict(model_type="gemma3_text", vocab_size=262208, hidden_size=5376, intermediate_size=21504,
                 num_hidden_layers=62, num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                 query_pre_attn_scalar=168, sliding_window=1024, sliding_window_pattern=6, rope_theta=1000000.0,
                 rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                 hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, max_position_embeddings=131072,
                 final_logit_softcapping=None, attn_logit_softcapping=None)
GEMMA3_V5 = {k: v for k, v in GEMMA3_V4.items()
             if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling", "sliding_window_pattern")} | dict(
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                     "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
    layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(62)])


@pytest.mark.parametrize("hf", [GEMMA3_V4, GEMMA3_V5,
                                {"model_type": "gemma3", "text_config": GEMMA3_V4, "vision_config": {}}],
                         ids=["transformers4", "transformers5", "with_vision"])
def test_gemma3_config_in_every_spelling(hf):
    cfg = ModelConfig.from_hf(hf)
    assert cfg.model_type == "gemma3_text" and cfg.tie_word_embeddings
    assert [cfg.layer_window(i) for i in range(7)] == [1024] * 5 + [None, 1024]
    assert cfg.sm_scale == 168**-0.5 and cfg.hidden_act == "gelu_pytorch_tanh" and cfg.qk_norm
    base = 1.0 / 10000.0 ** (np.arange(0, 128, 2) / 128)
    np.testing.assert_allclose(cfg.layer_inv_freq(0), base, rtol=1e-6)  # sliding: local base, unscaled
    np.testing.assert_allclose(cfg.layer_inv_freq(5), 1.0 / 1000000.0 ** (np.arange(0, 128, 2) / 128) / 8.0,
                               rtol=1e-6)  # full: global base, linear scaling


def test_gemma2_alternates_sliding_and_full_layers_without_layer_types():
    cfg = ModelConfig.from_hf(dict(GEMMA3_V4, model_type="gemma2", num_hidden_layers=4, sliding_window=4096,
                                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0))
    assert [cfg.layer_window(i) for i in range(4)] == [4096, None, 4096, None]
    assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (50.0, 30.0)


@pytest.fixture(scope="module")
def gemma3_folder(tmp_path_factory):
    # 8 query / 4 kv heads: split evenly on 2 and 4 devices; a window of 5 under the prompts' lengths.
    return tiny.make_checkpoint(tmp_path_factory.mktemp("gemma3"), "gemma3_text", num_attention_heads=8,
                                num_key_value_heads=4, head_dim=8, query_pre_attn_scalar=8, sliding_window=5,
                                layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True)


@pytest.fixture(scope="module")
def gemma2_folder(tmp_path_factory):
    return tiny.make_checkpoint(tmp_path_factory.mktemp("gemma2"), "gemma2", num_attention_heads=8,
                                num_key_value_heads=4, head_dim=8, query_pre_attn_scalar=8, sliding_window=5,
                                attn_logit_softcapping=5.0, final_logit_softcapping=3.0, tie_word_embeddings=True)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
@pytest.mark.parametrize("tp", [2, 4])
def test_gemma_on_several_devices_gives_one_devices_logits_and_tokens(request, family, tp):
    loaded = load_model(str(request.getfixturevalue(f"{family}_folder")), dtype="float32", progress=False)
    prompts = [list(range(5, 29)), list(range(40, 51))]
    ref_logits, ref_tokens = run_logits(loaded, prompts, decode_steps=10)
    params, cfg = shard_params(loaded.params, make_mesh(tp), loaded.cfg)
    assert len(params.layers[0].wqkv.sharding.device_set) == tp
    sharded = loaded.__class__(**{**loaded.__dict__, "params": params, "cfg": cfg})
    logits, tokens = run_logits(sharded, prompts, decode_steps=10)
    assert np.abs(logits - ref_logits).max() < 1e-4
    assert (tokens == ref_tokens).all()


def test_sliding_layers_keep_rings_and_the_pool_pays_for_full_layers_only(gemma3_folder):
    """Page accounting: with 1 GiB of KV cache, the pool's page costs the full layer only and the sliding layer holds
    a fixed ring per slot, sized by its window and the step's token budget."""
    from jaxserve import LLM

    llm = LLM(str(gemma3_folder), max_model_len=256, max_num_seqs=4, max_num_batched_tokens=16, page_size=4,
              kv_cache_memory_gb=1.0, compile_cache_dir="", progress=False, warm_up=False)
    core = llm.engine.core
    layout = core.kv_layout
    one_layer = 2 * 4 * 4 * 8 * 4  # K and V, kv heads, page_size, head_dim, float32
    assert layout.page_bytes == one_layer  # the full layer alone
    assert layout.ring_pages == -(-(5 - 1 + 16) // 4) + 1  # window 5 - 1 before the step, 16 tokens, 1 unaligned
    assert layout.ring_bytes == layout.ring_pages * 4 * one_layer
    sliding, full = (x.shape[0] for x in core.runner.cache.kv)
    assert sliding == layout.ring_pages * 4
    assert full == core.block_manager.num_pages == min((2**30 - layout.ring_bytes) // one_layer, 64 * 4)
    assert not core.block_manager.enable_prefix_caching


def test_greedy_tokens_through_wrapping_rings_match_transformers(gemma3_folder):
    """A context many times the ring (window 5, 16-token steps: 6 pages of 4): chunked prefill and decode through
    the engine give transformers' greedy tokens, and each token's logprob within 1e-4 of transformers'."""
    import torch
    from transformers import AutoModelForCausalLM

    from jaxserve import LLM, SamplingParams

    llm = LLM(str(gemma3_folder), max_model_len=128, max_num_seqs=2, max_num_batched_tokens=16, page_size=4,
              compile_cache_dir="", progress=False, warm_up=False)
    prompts = [list(range(3, 40)), list(range(60, 83))]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=0),
                        use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(gemma3_folder, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs):
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=None,
                           pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        tokens = want.sequences[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == tokens
        theirs = [torch.log_softmax(step[0], -1)[t].item() for step, t in zip(want.logits, tokens)]
        ours = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, tokens)]
        assert np.abs(np.array(ours) - np.array(theirs)).max() < 1e-4


@pytest.mark.parametrize("model_type,overrides", [
    ("gemma2", dict(attn_logit_softcapping=5.0, final_logit_softcapping=3.0, sliding_window=5,
                    query_pre_attn_scalar=16)),
    # six layers: llama.cpp's fixed Gemma 3 pattern (five sliding, one full) is what the file implies
    ("gemma3_text", dict(num_hidden_layers=6, sliding_window=5, query_pre_attn_scalar=16, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}})),
], ids=["gemma2", "gemma3"])
def test_a_gemma_gguf_loads_as_its_safetensors(tmp_path, model_type, overrides):
    """llama.cpp's gemma2 / gemma3 files (norms stored as 1 + w, sandwich norm names, soft caps, the window,
    linear rope scaling) give the safetensors checkpoint's configuration and logits."""
    from gguf_writer import write_gguf_from_hf

    folder = tiny.make_checkpoint(tmp_path / "hf", model_type, tie_word_embeddings=True, **overrides)
    write_gguf_from_hf(folder, tmp_path / "model.gguf")
    hf = load_model(str(folder), dtype="float32", progress=False)
    gguf = load_model(str(tmp_path / "model.gguf"), dtype="float32", progress=False)
    fields = ("layer_types", "sliding_window", "sm_scale", "attn_logit_softcapping", "final_logit_softcapping",
              "hidden_act", "local_rope_theta", "rope_scaling", "qk_norm", "rope_theta")
    assert [getattr(gguf.cfg, f) for f in fields] == [getattr(hf.cfg, f) for f in fields]
    prompts = [list(range(5, 29)), list(range(40, 51))]
    ours, tokens = run_logits(gguf, prompts, decode_steps=4)
    want, want_tokens = run_logits(hf, prompts, decode_steps=4)
    assert np.abs(ours - want).max() < 1e-5 and (tokens == want_tokens).all()


@pytest.mark.parametrize("prefix", ["language_model.model.", "model.language_model."])
def test_a_gemma3_checkpoint_with_vision_serves_its_text_decoder(gemma3_folder, tmp_path, prefix):
    """Gemma3ForConditionalGeneration folders (config with text_config; decoder tensors under transformers 4's or
    5's prefix, vision tensors beside them) load as the text model."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "vision"
    shutil.copytree(gemma3_folder, folder)
    tensors = load_file(folder / "model.safetensors")
    renamed = {prefix + k.removeprefix("model."): v for k, v in tensors.items()}
    renamed["model.vision_tower.patch_embedding.weight"] = np.zeros((4, 3), np.float32)
    save_file(renamed, str(folder / "model.safetensors"), metadata={"format": "pt"})
    text = json.loads((folder / "config.json").read_text())
    config = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": text,
              "vision_config": {"model_type": "siglip_vision_model"}}
    (folder / "config.json").write_text(json.dumps(config))
    prompts = [list(range(5, 29))]
    want, _ = run_logits(load_model(str(gemma3_folder), dtype="float32", progress=False), prompts, decode_steps=3)
    ours, _ = run_logits(load_model(str(folder), dtype="float32", progress=False), prompts, decode_steps=3)
    assert np.array_equal(ours, want)
