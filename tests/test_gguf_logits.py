"""The same tiny checkpoint loaded from safetensors and from a GGUF made from it gives the same logits."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

import tiny
from gguf_writer import write_gguf_from_hf
from jaxserve.weights.loader import load_model
from paged import run_logits

PROMPTS = [list(range(3, 27)), list(range(50, 61))]


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def pair(request, tmp_path_factory):
    folder = tiny.make_checkpoint(tmp_path_factory.mktemp(request.param), request.param, tie_word_embeddings=True)
    ref = load_model(str(folder), dtype="float32", progress=False)
    ref_logits, ref_tokens = run_logits(ref, PROMPTS, decode_steps=10)
    return folder, ref_logits, ref_tokens


@pytest.mark.parametrize("qtype,rel_tol", [(QT.F32, 1e-6), (QT.F16, 0.01), (QT.Q8_0, 0.1)])
def test_gguf_logits_match_safetensors(pair, qtype, rel_tol, tmp_path):
    # Tolerances relative to the largest logit (~6 here): F32 is exact. F16 rounds each weight by up to
    # 2^-11 relative and Q8_0 by up to amax/254 per 32 weights; these random weights (std 0.2) amplify that
    # through the layers to ~0.5% (F16) and ~5% (Q8_0) of the logit range.
    folder, ref_logits, ref_tokens = pair
    path = tmp_path / "m.gguf"
    write_gguf_from_hf(folder, path, lambda name, shape: qtype)
    # Decode steps are fed the safetensors model's tokens, so both runs see the same inputs.
    logits, _ = run_logits(load_model(str(path), dtype="float32", progress=False), PROMPTS, decode_steps=10,
                           feed=ref_tokens)
    assert np.abs(logits - ref_logits).max() <= rel_tol * np.abs(ref_logits).max()
    assert np.corrcoef(logits.ravel(), ref_logits.ravel())[0, 1] > 0.999
