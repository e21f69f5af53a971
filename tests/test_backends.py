"""The attention dispatch point: each forced backend runs the whole model to the reference's logits."""

import numpy as np
import pytest

import tiny
from jaxserve.models.attention import resolve_backend
from jaxserve.weights.loader import load_model
from jaxserve.parallel.sharding import make_mesh, shard_params
from paged import run_logits

PROMPTS = [list(range(3, 23)), list(range(30, 37))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tiny.make_checkpoint(tmp_path_factory.mktemp("backends"), "llama", num_attention_heads=8,
                                  num_key_value_heads=2, head_dim=64, hidden_size=128)
    loaded = load_model(str(folder), dtype="float32", progress=False)
    logits, tokens = run_logits(loaded, PROMPTS, decode_steps=4, page_size=16)
    return loaded, logits, tokens


def test_auto_picks_the_reference_on_cpu():
    assert resolve_backend("auto").kernel == "reference"
    assert resolve_backend("pallas_tpu_interpret").interpret
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash")


@pytest.mark.parametrize("backend", ["pallas_tpu_interpret", "pallas_gpu_interpret"])
def test_pallas_kernels_through_the_model(reference, backend):
    loaded, ref_logits, ref_tokens = reference
    logits, tokens = run_logits(loaded, PROMPTS, decode_steps=4, page_size=16, backend=backend, feed=ref_tokens)
    assert np.abs(logits - ref_logits).max() < 1e-4


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_pallas_kernel_under_shard_map_on_two_devices(reference, expert_parallel):
    """On a mesh laid along `model`, or along `expert` (--enable-expert-parallel), each device attends its heads."""
    loaded, ref_logits, ref_tokens = reference
    mesh = make_mesh(2, enable_expert_parallel=expert_parallel)
    sharded = loaded.__class__(**{**loaded.__dict__, **dict(zip(("params", "cfg"), shard_params(loaded.params, mesh, loaded.cfg)))})
    logits, _ = run_logits(sharded, PROMPTS, decode_steps=4, page_size=16, backend="pallas_tpu_interpret",
                           feed=ref_tokens, mesh=mesh)
    assert np.abs(logits - ref_logits).max() < 1e-4


@pytest.mark.parametrize("backend", ["pallas_tpu_interpret", "pallas_gpu_interpret"])
def test_pallas_kernels_through_gemma_rings_and_soft_caps(tmp_path, backend):
    """Gemma 2: a sliding layer reading its ring past a wrap (window 5, a ring of 3 pages of 16 for these 20-token
    prompts, 30 decode steps), attention soft caps, a full layer: the kernels give the reference's logits."""
    folder = tiny.make_checkpoint(tmp_path, "gemma2", num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                                  hidden_size=128, query_pre_attn_scalar=64, sliding_window=5,
                                  attn_logit_softcapping=5.0, final_logit_softcapping=3.0, tie_word_embeddings=True)
    loaded = load_model(str(folder), dtype="float32", progress=False)
    ref_logits, ref_tokens = run_logits(loaded, PROMPTS, decode_steps=30, page_size=16)
    logits, _ = run_logits(loaded, PROMPTS, decode_steps=30, page_size=16, backend=backend, feed=ref_tokens)
    assert np.abs(logits - ref_logits).max() < 1e-4
