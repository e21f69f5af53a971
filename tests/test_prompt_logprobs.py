"""Prompt logprobs (vLLM's SamplingParams.prompt_logprobs) against transformers' full-sequence logits."""

import numpy as np
import pytest
import torch

import tiny
from jaxserve import LLM, SamplingParams
from jaxserve.engine import InvalidRequest


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.make_checkpoint(tmp_path_factory.mktemp("plp"), "llama")


@pytest.fixture(scope="module")
def llm(folder):
    # A token budget of 16 splits a 40-token prompt over three prefill chunks.
    return LLM(str(folder), max_model_len=256, max_num_seqs=4, max_num_batched_tokens=16, page_size=8,
               compile_cache_dir="", progress=False)


def _reference(folder, prompt):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0]
    return torch.log_softmax(logits, -1).numpy()  # [len, vocab]: row p scores token p + 1


def test_prompt_logprobs_match_transformers_across_chunks_and_cached_prefix(folder, llm):
    prompt = np.random.default_rng(0).integers(3, llm.engine.model.cfg.vocab_size, 40).tolist()
    ref = _reference(folder, prompt)
    llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)  # now in the prefix cache
    before = llm.engine.stats()["compile_count"]
    out = llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3), use_tqdm=False)[0]
    assert llm.engine.stats()["compile_count"] == before  # the prompt-logprob programs were warmed up
    assert out.num_cached_tokens == 0  # a request with prompt logprobs recomputes its cached prefix
    plp = out.prompt_logprobs
    assert len(plp) == 40 and plp[0] is None
    for p in range(1, 40):
        entry = plp[p]
        row = ref[p - 1]
        order = np.argsort(-row, kind="stable")
        ids = list(entry)
        assert ids[0] == prompt[p]  # the prompt's own token first, then the top 3 by rank
        assert [t for _, t in sorted((lp.rank, t) for t, lp in entry.items() if lp.rank <= 3)] == order[:3].tolist()
        assert entry[prompt[p]].rank == int((row > row[prompt[p]]).sum()) + 1
        for t, lp in entry.items():
            assert lp.logprob == pytest.approx(row[t], abs=1e-4)
            assert lp.decoded_token == llm.engine.tokenizer.decode([t])


def test_no_prompt_logprobs_unless_asked_and_minus_one_refused(llm):
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert out.prompt_logprobs is None
    one = llm.generate([[5]], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    assert one.prompt_logprobs == [None]
    vocab = llm.engine.model.cfg.vocab_size
    with pytest.raises(InvalidRequest, match=f"Requested prompt logprobs of {vocab}, which is greater than max "
                                             "allowed: 20"):
        llm.engine.validate([5, 6], SamplingParams(prompt_logprobs=-1))
    with pytest.raises(ValueError, match="Requested prompt logprobs of 21, which is greater than max allowed: 20"):
        SamplingParams(prompt_logprobs=21)
