"""Warm-up on several cores: every bucket's programs compiled once, ahead, on a thread pool, and called directly by
the steps; serving afterwards compiles nothing and generates what an engine warmed up on one core does."""

import threading
import unittest.mock

import jax
import numpy as np

import tiny
from jaxserve import LLM, SamplingParams
from jaxserve.text.structured_output import StructuredOutput

OPTIONS = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32, page_size=8, progress=False)


def test_programs_compile_once_in_parallel_and_serving_compiles_nothing(tmp_path, monkeypatch):
    folder = tiny.make_checkpoint(tmp_path / "model")
    traced, threads = [], set()

    # Tracing is counted, not compiling: an earlier test's persistent compile cache (process-wide) may serve a
    # program without a backend compile, but every program is traced once per shape whatever the cache.
    def listen(event, _duration, **kw):
        if event.endswith("jaxpr_trace_duration"):
            traced.append(kw.get("fun_name"))
            if kw.get("fun_name") == "_forward":
                threads.add(threading.current_thread() is threading.main_thread())

    jax.monitoring.register_event_duration_secs_listener(listen)
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1})  # the parallel path, whatever this machine has
    llm = LLM(str(folder), compile_cache_dir=str(tmp_path / "cache"), **OPTIONS)
    buckets = llm.engine.core.runner.buckets
    assert len(buckets) > 2
    # Each bucket's forward and sampler built once, ahead on the pool's threads, not again by the warm-up steps.
    assert traced.count("_forward") == len(buckets) and threads == {False}
    assert traced.count("_sample") == len({min(b, OPTIONS["max_num_seqs"]) for b in buckets})
    before = llm.engine.stats()["compile_count"]
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 300, n).tolist() for n in (1, 5, 17, 40)]
    # Grammar masks and prompt logprobs too, in steps of every size (their programs were compiled ahead).
    schema = StructuredOutput.from_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
    params = [SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, structured_output=schema),
              SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, prompt_logprobs=2),
              SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, structured_output=schema),
              SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, prompt_logprobs=1)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.stats()["compile_count"] == before
    monkeypatch.undo()
    with unittest.mock.patch("os.sched_getaffinity", lambda _pid: {0}):  # one core: compiled by padding steps
        serial_llm = LLM(str(folder), compile_cache_dir="", **OPTIONS)
    assert serial_llm.engine.core.runner.executables == {}
    serial = serial_llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in serial]
    assert [o.prompt_logprobs for o in outs] == [o.prompt_logprobs for o in serial]
    assert outs[1].prompt_logprobs is not None and outs[0].prompt_logprobs is None
