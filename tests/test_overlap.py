"""Overlapped steps (async scheduling): step N+1 is dispatched before step N's tokens reach the host.

Every output must equal what the engine gives when each step waits for its own tokens; a sequence that step N
ends has computed one row too many in N+1, which is dropped (not shown, not counted, its pages freed).
"""

import dataclasses

import numpy as np
import pytest

import tiny
from jaxserve import LLM, SamplingParams
from jaxserve.text.structured_output import StructuredOutput


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.make_checkpoint(tmp_path_factory.mktemp("overlap"), "llama")


@pytest.fixture(scope="module")
def llm(folder):
    return LLM(str(folder), max_model_len=256, max_num_seqs=8, max_num_batched_tokens=32, page_size=8,
               compile_cache_dir="", progress=False)


def _run(llm, prompts, params, overlap: bool):
    llm.engine.core.async_scheduling = overlap
    try:
        before = llm.engine.stats()["computed_tokens"]
        outs = llm.generate(prompts, params, use_tqdm=False)
        return outs, llm.engine.stats()["computed_tokens"] - before
    finally:
        llm.engine.core.async_scheduling = True


def _plain(outs):
    """Whole outputs as comparable values (text, ids, reasons, logprobs, prompt logprobs), in order."""
    return [(o.prompt_token_ids, o.prompt_logprobs, [dataclasses.astuple(c) for c in o.outputs]) for o in outs]


def _workload(llm):
    rng = np.random.default_rng(7)
    vocab = llm.engine.model.cfg.vocab_size
    prompts = [rng.integers(3, vocab, n).tolist() for n in (5, 40, 17, 9, 23, 12, 30, 3, 11, 19)]
    # A stop string that the greedy output of prompt 0 contains, so it ends on the host's text check.
    probe = llm.generate(prompts[0], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].text
    stop = probe[len(probe) // 2:len(probe) // 2 + 2]
    params = [
        SamplingParams(max_tokens=24, temperature=0.0, stop=[stop]),
        SamplingParams(max_tokens=13, temperature=0.0, ignore_eos=True, logprobs=3, prompt_logprobs=2),
        SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, top_k=20, seed=5, n=2, presence_penalty=0.5),
        SamplingParams(max_tokens=16, temperature=1.0, min_p=0.05, seed=11, repetition_penalty=1.3, min_tokens=4),
        SamplingParams(max_tokens=18, temperature=0.0, structured_output=StructuredOutput(json_object=True)),
        SamplingParams(max_tokens=9, temperature=0.7, seed=3, stop_token_ids=[int(prompts[5][0])], logit_bias={7: 3.0}),
        SamplingParams(max_tokens=30, temperature=0.0),  # may end early at EOS
        SamplingParams(max_tokens=1, temperature=0.0),
        SamplingParams(max_tokens=12, temperature=0.9, seed=1, frequency_penalty=0.4, bad_words=[probe[:3]]),
        SamplingParams(max_tokens=21, temperature=0.0, ignore_eos=True),
    ]
    return prompts, params


def test_overlapped_steps_give_the_same_outputs(llm):
    prompts, params = _workload(llm)
    _run(llm, prompts, params, overlap=False)  # fills the prefix cache, so both timed runs start from the same one
    want, want_computed = _run(llm, prompts, params, overlap=False)
    got, got_computed = _run(llm, prompts, params, overlap=True)
    assert _plain(got) == _plain(want)
    assert want[0].outputs[0].finish_reason == "stop" and want[0].outputs[0].stop_reason is not None
    assert got_computed == want_computed  # rows of sequences that had already ended are not counted
    blocks = llm.engine.block_manager
    assert blocks.num_free == blocks.num_pages


def test_overlap_with_preemption_gives_the_same_outputs(folder):
    # 10 pages of 8 tokens: the batch cannot all fit, so sequences are preempted (some with a token in flight).
    small = LLM(str(folder), max_model_len=80, max_num_seqs=4, max_num_batched_tokens=32, page_size=8,
                num_kv_pages=10, compile_cache_dir="", progress=False)
    rng = np.random.default_rng(3)
    vocab = small.engine.model.cfg.vocab_size
    prompts = [rng.integers(3, vocab, n).tolist() for n in (30, 25, 28, 31, 14)]
    params = [SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=40, temperature=0.8, top_p=0.95, seed=2, ignore_eos=True),
              SamplingParams(max_tokens=35, temperature=0.0, ignore_eos=True, logprobs=2),
              SamplingParams(max_tokens=40, temperature=1.0, top_k=5, seed=9, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0.0)]
    want, _ = _run(small, prompts, params, overlap=False)
    preempted = small.engine.scheduler.num_preemptions
    got, _ = _run(small, prompts, params, overlap=True)
    assert preempted > 0 and small.engine.scheduler.num_preemptions > preempted
    assert _plain(got) == _plain(want)
    assert small.engine.block_manager.num_free == small.engine.block_manager.num_pages


def test_a_decoding_sequence_is_fed_its_token_before_the_host_reads_it(llm):
    """With overlap, each decode step after the first feeds a placeholder; the step is dispatched while the
    previous one's token is still on the device."""
    engine = llm.engine
    prompt = [5, 6, 7, 8]
    engine.add_request("lag", prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    seen = []
    real_launch = engine.runner.launch

    def launch(scheduled):
        seq = scheduled[0][0]
        seen.append((len(seq.token_ids), seq.num_in_flight))
        return real_launch(scheduled)

    engine.runner.launch = launch
    try:
        outs = []
        while engine.has_unfinished():
            outs += engine.step()
    finally:
        engine.runner.launch = real_launch
    # Prefill (4 known tokens, none in flight), then 5 decode steps, each with the previous token in flight;
    # the sixth token ends the sequence by length, so no seventh step is scheduled.
    assert seen == [(4, 0)] + [(4 + i, 1) for i in range(5)]
    assert len(outs[-1].outputs[0].token_ids) == 6 and outs[-1].finished


def test_more_constrained_rows_than_one_mask_call_carries(folder):
    """Grammar masks travel MASK_ROWS rows per call: with 12 constrained rows in a step, each row still gets its
    own mask (a choice between two words, exactly one of which each output must be), overlapped or not."""
    from jaxserve.core.model_runner import MASK_ROWS

    wide = LLM(str(folder), max_model_len=128, max_num_seqs=16, max_num_batched_tokens=64, page_size=8,
               compile_cache_dir="", progress=False)
    choices = [["yes", "no"], ["red", "blue"], ["left", "right"]]
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, wide.engine.model.cfg.vocab_size, 6).tolist() for _ in range(12)]
    params = [SamplingParams(max_tokens=8, temperature=1.0, seed=i,
                             structured_output=StructuredOutput(choice=tuple(choices[i % 3]))) for i in range(12)]
    assert len(params) > MASK_ROWS
    want, _ = _run(wide, prompts, params, overlap=False)
    got, _ = _run(wide, prompts, params, overlap=True)
    assert _plain(got) == _plain(want)
    assert [o.outputs[0].text in choices[i % 3] for i, o in enumerate(got)] == [True] * 12
