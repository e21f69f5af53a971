"""Mixtures of experts (models/moe.py): routing without dropping, the config fields, quantized experts, and expert /
tensor parallelism on 2 and 4 simulated devices against one device. (Parity with transformers:
test_model_parity.py and test_moe_parity.py, which need torch.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from jaxserve import LLM, SamplingParams
from jaxserve.models import moe
from jaxserve.models.config import ModelConfig
from jaxserve.parallel.sharding import make_mesh, shard_params
from jaxserve.weights.loader import load_model
from paged import run_logits

EXPERTS = 8
# 8 query / 4 kv heads split evenly on 2 and 4 devices; layer 0 dense (mlp_only_layers), layer 1 sparse.
QWEN3_MOE = dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8, num_experts=EXPERTS, num_experts_per_tok=2,
                 moe_intermediate_size=32, mlp_only_layers=[0], norm_topk_prob=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.make_checkpoint(tmp_path_factory.mktemp("moe"), "qwen3_moe", **QWEN3_MOE)


@pytest.fixture(scope="module")
def loaded(folder):
    return load_model(str(folder), dtype="float32", progress=False)


def _reference_moe(h, router, w_gate, w_up, w_down, k, normalize):
    """Token by token in numpy: softmax, top k, (renormalize), SwiGLU of each chosen expert, weighted sum."""
    out = np.zeros_like(h)
    for t in range(h.shape[0]):
        logits = h[t] @ router
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs, kind="stable")[:k]
        weights = probs[top] / probs[top].sum() if normalize else probs[top]
        for e, w in zip(top, weights):
            gate, up = h[t] @ w_gate[e], h[t] @ w_up[e]
            out[t] += w * ((gate / (1 + np.exp(-gate)) * up) @ w_down[e])
    return out


@pytest.mark.parametrize("normalize", [True, False])
def test_every_token_reaches_its_experts_however_uneven_the_load(normalize):
    """37 tokens, 3 experts each of 6: a router biased so that expert 4 gets nearly every token and expert 1 almost
    none (no capacity limit drops any), against a token-by-token reference."""
    rng = np.random.default_rng(0)
    hidden, inter, experts, k, t = 16, 8, 6, 3, 37
    h = rng.normal(size=(t, hidden)).astype(np.float32)
    h[:, 0] = 3.0 + rng.random(t)  # a shared direction the router's column 4 favours
    router = rng.normal(0, 0.3, (hidden, experts)).astype(np.float32)
    router[0, 4], router[0, 1] = 4.0, -4.0
    w_gate, w_up = (rng.normal(0, 0.3, (experts, hidden, inter)).astype(np.float32) for _ in range(2))
    w_down = rng.normal(0, 0.3, (experts, inter, hidden)).astype(np.float32)
    cfg = ModelConfig(model_type="qwen3_moe", vocab_size=1, hidden_size=hidden, intermediate_size=inter, num_layers=1,
                      num_heads=1, num_kv_heads=1, head_dim=1, rms_norm_eps=1e-6, rope_theta=1.0,
                      max_position_embeddings=1, tie_word_embeddings=False, num_experts=experts,
                      num_experts_per_tok=k, moe_intermediate_size=inter, norm_topk_prob=normalize, moe_layers=(True,))
    layer = moe.Layer(attn_norm=None, wqkv=None, wo=None, mlp_norm=None, router=jnp.asarray(router),
                      w_gate_exps=jnp.asarray(w_gate), w_up_exps=jnp.asarray(w_up), w_down_exps=jnp.asarray(w_down))
    _, chosen = moe.route(jnp.asarray(h), layer.router, cfg)
    load = np.bincount(np.asarray(chosen).ravel(), minlength=experts)
    assert load[4] >= t - 2 and load.min() <= 3 and load.sum() == t * k
    got = jax.jit(moe.moe_mlp, static_argnames="cfg")(layer, jnp.asarray(h), cfg)
    want = _reference_moe(h, router, w_gate, w_up, w_down, k, normalize)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)


def test_config_reads_real_and_transformers_5_spellings():
    """Qwen3-30B-A3B's config.json says num_experts; transformers 5 writes num_local_experts. decoder_sparse_step and
    mlp_only_layers decide the dense layers; Mixtral's experts use intermediate_size and always renormalize."""
    base = dict(vocab_size=10, hidden_size=8, intermediate_size=24, num_hidden_layers=4, num_attention_heads=2)
    real = ModelConfig.from_hf(dict(base, model_type="qwen3_moe", num_experts=128, num_experts_per_tok=8,
                                    moe_intermediate_size=16, decoder_sparse_step=2, mlp_only_layers=[3],
                                    norm_topk_prob=True))
    assert (real.num_experts, real.num_experts_per_tok, real.moe_intermediate_size) == (128, 8, 16)
    assert real.moe_layers == (False, True, False, False) and real.norm_topk_prob and real.qk_norm
    written = ModelConfig.from_hf(dict(base, model_type="qwen3_moe", num_local_experts=64, num_experts_per_tok=4,
                                       moe_intermediate_size=16))
    assert written.num_experts == 64 and written.moe_layers == (True,) * 4 and not written.norm_topk_prob
    mixtral = ModelConfig.from_hf(dict(base, model_type="mixtral", num_local_experts=8, num_experts_per_tok=2))
    assert (mixtral.moe_intermediate_size, mixtral.norm_topk_prob, mixtral.qk_norm) == (24, True, False)


def test_int8_experts_run_from_their_codes_and_int4_is_refused(folder, loaded):
    prompts = [list(range(5, 29))]
    ref, _ = run_logits(loaded, prompts, decode_steps=3)
    int8 = load_model(str(folder), dtype="float32", quantization="int8", progress=False)
    w = int8.params.layers[1].w_down_exps
    assert w.values.dtype == jnp.int8 and w.values.shape == (EXPERTS, 32, 64) and w.scale.shape == (EXPERTS, 1, 64)
    logits, _ = run_logits(int8, prompts, decode_steps=3)
    assert 0 < np.abs(logits - ref).max() < 0.1 * np.abs(ref).max()
    with pytest.raises(ValueError, match="expert weights quantized in groups"):
        load_model(str(folder), dtype="float32", quantization="int4", quantization_group_size=16, progress=False)


@pytest.mark.parametrize("tp,expert_parallel", [(2, True), (4, True), (2, False)])
def test_logits_and_tokens_match_one_device(loaded, tp, expert_parallel):
    """Expert parallel: each device holds EXPERTS / tp whole experts (tensor parallel: every expert, 1 / tp of its
    columns), attention split over the same devices either way; logits within 1e-4 and the same greedy tokens."""
    prompts = [list(range(5, 29)), list(range(40, 51))]
    ref_logits, ref_tokens = run_logits(loaded, prompts, decode_steps=8)
    mesh = make_mesh(tp, enable_expert_parallel=expert_parallel)
    params, cfg = shard_params(loaded.params, mesh, loaded.cfg)
    sparse, dense = params.layers[1], params.layers[0]
    for w in (sparse.w_gate_exps, sparse.w_up_exps, sparse.w_down_exps):
        assert len(w.sharding.device_set) == tp
        local = w.sharding.shard_shape(w.shape)
        assert local[0] == (EXPERTS // tp if expert_parallel else EXPERTS)
        assert np.prod(local) == np.prod(w.shape) // tp
    assert dense.wqkv.sharding.shard_shape(dense.wqkv.shape)[1] == dense.wqkv.shape[1] // tp
    assert dense.w_gate_up.sharding.shard_shape(dense.w_gate_up.shape)[1] == dense.w_gate_up.shape[1] // tp
    logits, tokens = run_logits(dataclasses.replace(loaded, params=params, cfg=cfg), prompts, decode_steps=8,
                                mesh=mesh)
    assert np.abs(logits - ref_logits).max() < 1e-4
    assert (tokens == ref_tokens).all()


@pytest.mark.parametrize("expert_mesh", [False, True])
def test_expert_parallel_moves_rows_not_weights(loaded, expert_mesh):
    """With the experts split over 4 devices, the compiled step gathers no expert weights when the model runs them
    under shard_map (the mesh given: as the engine does); left to XLA's partitioner (no mesh) it gathers them all."""
    import re

    from jaxserve import models
    from jaxserve.models import base
    from jaxserve.models.attention import resolve_backend
    from paged import _batch

    mesh = make_mesh(4, enable_expert_parallel=True)
    params, cfg = shard_params(loaded.params, mesh, loaded.cfg)
    backend = resolve_backend("reference", mesh if expert_mesh else None)
    batch = _batch([[5, 6, 7], [8, 9]], [0, 0], np.arange(8, dtype=np.int32).reshape(2, 4), 4)
    step = jax.jit(lambda p, c, b: models.forward(p, c, b, cfg, backend))
    text = step.lower(params, base.init_cache(cfg, 16, 4, np.float32), batch).compile().as_text()
    gathered = {tuple(map(int, dims.split(","))) for dims in re.findall(r"= f32\[([\d,]+)\]\S* all-gather\(", text)}
    expert_shapes = {w.shape for w in (params.layers[1].w_gate_exps, params.layers[1].w_down_exps)}
    assert (expert_shapes & gathered) == (set() if expert_mesh else expert_shapes)


def test_engine_with_expert_parallel_gives_one_devices_tokens(folder):
    opts = dict(max_model_len=96, max_num_seqs=4, max_num_batched_tokens=16, page_size=8, compile_cache_dir="",
                progress=False, warm_up=False)
    prompts = ["Hello world", "The quick brown fox jumps", "Paris"]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    one = LLM(str(folder), **opts).generate(prompts, params, use_tqdm=False)
    ep = LLM(str(folder), tensor_parallel_size=4, enable_expert_parallel=True, **opts)
    w = ep.engine.core.model.params.layers[1].w_down_exps
    assert w.sharding.shard_shape(w.shape)[0] == EXPERTS // 4
    many = ep.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in many] == [o.outputs[0].token_ids for o in one]


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_gguf_files_load_as_the_safetensors_model(tmp_path, model_type):
    """llama.cpp's layouts (tests/gguf_writer.py converts as its converter does): Mixtral as "llama" with
    expert_count, Qwen3-MoE as "qwen3moe"; stacked ffn_{gate,up,down}_exps and ffn_gate_inp. Every layer sparse, as
    llama.cpp has them. Same float32 weights, so the same logits."""
    from gguf_writer import write_gguf_from_hf

    overrides = {"num_local_experts": 4, "num_experts_per_tok": 2} if model_type == "mixtral" else \
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True}
    folder = tiny.make_checkpoint(tmp_path / "hf", model_type, **overrides)
    write_gguf_from_hf(folder, tmp_path / "model.gguf")
    hf = load_model(str(folder), dtype="float32", progress=False)
    gguf = load_model(str(tmp_path / "model.gguf"), dtype="float32", progress=False)
    assert gguf.cfg.model_type == model_type
    assert (gguf.cfg.num_experts, gguf.cfg.num_experts_per_tok, gguf.cfg.moe_layers) == (4, 2, (True, True))
    assert gguf.cfg.moe_intermediate_size == hf.cfg.moe_intermediate_size and gguf.cfg.norm_topk_prob
    prompts = [list(range(5, 29))]
    ref, ref_tokens = run_logits(hf, prompts, decode_steps=4)
    logits, tokens = run_logits(gguf, prompts, decode_steps=4)
    assert np.abs(logits - ref).max() < 1e-4 and (tokens == ref_tokens).all()
