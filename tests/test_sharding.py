"""Tensor parallelism on 4 simulated CPU devices gives one device's tokens and logits."""

import jax
import numpy as np
import pytest

import tiny
from jaxserve import LLM, SamplingParams
from jaxserve.weights.loader import load_model
from jaxserve.parallel.sharding import make_mesh, shard_params
from paged import run_logits



def test_four_devices_are_simulated():
    assert len(jax.devices()) == 4


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    # 8 query / 4 kv heads: split evenly on 2 and 4 devices, so weights and cache really are sharded.
    return tiny.make_checkpoint(tmp_path_factory.mktemp("shard"), "qwen2", num_attention_heads=8,
                                num_key_value_heads=4, head_dim=8)


def _compare_logits(loaded, tp, tol):
    prompts = [list(range(5, 29)), list(range(40, 51))]
    ref_logits, ref_tokens = run_logits(loaded, prompts, decode_steps=10)
    mesh = make_mesh(tp)
    sharded = loaded.__class__(**{**loaded.__dict__, **dict(zip(("params", "cfg"), shard_params(loaded.params, mesh, loaded.cfg)))})
    if tp == 4 and loaded.cfg.num_kv_heads % 4 == 0:
        assert len(sharded.params.layers[0].wqkv.sharding.device_set) == 4
    logits, tokens = run_logits(sharded, prompts, decode_steps=10)
    assert np.abs(logits - ref_logits).max() < tol
    assert (tokens == ref_tokens).all()


@pytest.mark.parametrize("tp", [2, 4])
def test_tiny_model_logits_and_tokens_match_one_device(tiny_folder, tp):
    _compare_logits(load_model(str(tiny_folder), dtype="float32", progress=False), tp, 1e-4)


@pytest.mark.parametrize("tp", [2, 4])
def test_engine_greedy_tokens_match_one_device(tiny_folder, tp):
    opts = dict(max_model_len=96, max_num_seqs=4, max_num_batched_tokens=16, page_size=8, compile_cache_dir="",
                progress=False, warm_up=False)
    prompts = ["Hello world", "The quick brown fox jumps", "Paris"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    one = LLM(str(tiny_folder), **opts).generate(prompts, params, use_tqdm=False)
    many = LLM(str(tiny_folder), tensor_parallel_size=tp, **opts).generate(
        prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in many] == [o.outputs[0].token_ids for o in one]


@pytest.fixture(scope="module")
def smollm2():
    return load_model(None, dtype="float32", progress=False)


@pytest.mark.parametrize("tp", [2, 4])
def test_default_model_logits_and_tokens_match_one_device(smollm2, tp):
    # 30 layers of float32 summed in another order: differences stay around 1e-4 on logits of magnitude ~20.
    _compare_logits(smollm2, tp, 2e-3)


def test_more_devices_than_kv_heads_repeat_each_head_once_per_device(tmp_path):
    """8 query / 2 kv heads on tp=4: each kv head is repeated twice at load, so every device holds one kv head
    of weights and cache (not both), and the engine's greedy tokens and the logits equal one device's."""
    folder = tiny.make_checkpoint(tmp_path, "qwen2", num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    loaded = load_model(str(folder), dtype="float32", progress=False)
    params, cfg = shard_params(loaded.params, make_mesh(4), loaded.cfg)
    assert (loaded.cfg.num_kv_heads, cfg.num_kv_heads, cfg.qkv_groups) == (2, 4, 4)
    # One group of columns per device: its 2 query heads, then its k head and v head (8 columns each).
    wqkv, one = params.layers[0].wqkv, np.asarray(loaded.params.layers[0].wqkv)  # one device: [q 64 | k 16 | v 16]
    assert wqkv.shape == (loaded.cfg.hidden_size, 4 * 32) and wqkv.sharding.shard_shape(wqkv.shape) == (wqkv.shape[0], 32)
    four_groups = np.asarray(wqkv).reshape(-1, 4, 32)
    for device in range(4):
        kv_head = device // 2  # each original kv head serves two devices
        np.testing.assert_array_equal(four_groups[:, device, :16], one[:, 16 * device:16 * device + 16])
        np.testing.assert_array_equal(four_groups[:, device, 16:24], one[:, 64 + 8 * kv_head:72 + 8 * kv_head])
        np.testing.assert_array_equal(four_groups[:, device, 24:], one[:, 80 + 8 * kv_head:88 + 8 * kv_head])
    _compare_logits(loaded, 4, 1e-4)
    opts = dict(max_model_len=96, max_num_seqs=4, max_num_batched_tokens=16, page_size=8, compile_cache_dir="",
                progress=False, warm_up=False)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = ["Hello world", "The quick brown fox jumps"]
    one = LLM(str(folder), **opts).generate(prompts, params, use_tqdm=False)
    four = LLM(str(folder), tensor_parallel_size=4, **opts)
    cache = four.engine.core.runner.cache.kv[0]  # [pages, page, 2 * kv heads, D]: each device one (K, V) pair
    assert cache.shape[2] == 8 and cache.sharding.shard_shape(cache.shape)[2] == 2
    many = four.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in many] == [o.outputs[0].token_ids for o in one]


def test_output_token_counts_stay_split_over_the_vocabulary():
    """The penalties' [slots, vocab] counts live split over the model axis; the forward pass counts each fed token
    on the device that holds its id (tokens at both edges of every device's range, a prompt token, a padding
    slot), giving the counts of one device."""
    import dataclasses

    import jax.numpy as jnp

    from jaxserve.core import sampler
    from jaxserve.parallel.sharding import by_vocab, replicated

    vocab, slots = 64, 3
    mesh = make_mesh(4)
    split = by_vocab(mesh, vocab)
    assert split.shard_shape((slots, vocab)) == (slots, 16)
    num_prompt = sampler.INT_PARAMS.index("num_prompt")
    tokens = jnp.array([0, 15, 16, 31, 32, 63, 63, 5, 9])
    token_slot = jnp.array([0, 0, 1, 1, 2, 2, 2, 0, 3])              # slot 3 = padding, dropped
    positions = jnp.array([4, 5, 4, 5, 4, 5, 6, 0, 4])               # position 0 of slot 0 is its prompt

    def run(placement, where):
        state = sampler.SamplerState.zeros(slots, vocab, placement)
        state = dataclasses.replace(state, ints=state.ints.at[:, num_prompt].set(1))
        out = jax.jit(lambda s: sampler.record_tokens(s, tokens, token_slot, positions, where))(state)
        return out.counts

    one = np.asarray(run(None, None))
    counts = run(sampler.SamplerState.placement(replicated(mesh), split), split)
    assert counts.sharding.is_equivalent_to(split, 2)
    np.testing.assert_array_equal(np.asarray(counts), one)
    assert one.sum() == 7 and one[2, 63] == 2 and one[0, 5] == 0
