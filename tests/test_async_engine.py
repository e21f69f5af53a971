"""AsyncEngine: concurrent streams, aborts that free pages at once, isolation of a failing request, overload."""

import asyncio
import dataclasses
import functools

import numpy as np
import pytest

import tiny
from jaxserve import SamplingParams
from jaxserve.sampling_params import RequestOutputKind
from jaxserve.async_engine import AsyncEngine, EngineOverloaded, RequestFailed
from jaxserve.engine import EngineConfig, InvalidRequest, LLMEngine
from jaxserve.text.output_processor import OutputProcessor

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = tiny.make_checkpoint(tmp_path_factory.mktemp("async"), "llama")
    cfg = EngineConfig(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=32, page_size=8,
                       compile_cache_dir="")
    llm_engine = LLMEngine(str(folder), config=cfg, progress=False)
    eng = AsyncEngine(llm_engine, max_waiting_requests=4)
    yield eng
    eng.shutdown()


async def _collect(eng, rid, prompt, params, kind=RequestOutputKind.DELTA):
    """The request's text and token ids put together from its delta outputs, and its last output."""
    text, tokens, last = "", [], None
    async for out in eng.generate(rid, prompt, dataclasses.replace(params, output_kind=kind)):
        text += out.outputs[0].text
        tokens += out.outputs[0].token_ids
        last = out
    return text, tokens, last


async def _wait_idle(eng):
    for _ in range(200):
        s = eng.stats()
        if s["running"] == 0 and s["waiting"] == 0 and s["kv_pages_free"] == s["kv_pages_total"]:
            return s
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine did not go idle: {eng.stats()}")


def test_concurrent_streams_concatenate_to_the_final_output(engine):
    prompts = [f"Hello world {i} " * (i + 1) for i in range(6)]  # more than max_num_seqs: some wait

    async def main():
        params = SamplingParams(max_tokens=10, stop=["zz"], **GREEDY)
        deltas = await asyncio.gather(*[_collect(engine, f"c{i}", p, params) for i, p in enumerate(prompts)])
        wholes = await asyncio.gather(*[_collect(engine, f"w{i}", p, params, RequestOutputKind.CUMULATIVE)
                                        for i, p in enumerate(prompts)])
        return zip(deltas, wholes)

    for (text, tokens, _), (_, _, whole) in asyncio.run(main()):
        assert whole.finished and text == whole.outputs[0].text and tokens == whole.outputs[0].token_ids
    asyncio.run(_wait_idle(engine))


def test_a_stop_string_found_on_the_output_thread_ends_the_sample_in_the_core(engine):
    """The output thread finds the stop string; the core, told later, may have made more tokens for the sample:
    they are not shown, and its pages are freed."""
    async def main():
        prompt = "Hello world " * 3
        text, tokens, _ = await _collect(engine, "full", prompt, SamplingParams(max_tokens=40, **GREEDY))
        stop = text[len(text) // 2:len(text) // 2 + 3]
        cut = await _collect(engine, "cut", prompt, SamplingParams(max_tokens=40, stop=[stop], **GREEDY))
        return text, tokens, stop, cut, await _wait_idle(engine)

    text, tokens, stop, (cut_text, cut_tokens, last), stats = asyncio.run(main())
    assert cut_text == text[:text.index(stop)]
    assert last.outputs[0].finish_reason == "stop" and last.outputs[0].stop_reason == stop
    assert cut_tokens == tokens[:len(cut_tokens)] and len(cut_tokens) < len(tokens)
    assert stats["kv_pages_free"] == stats["kv_pages_total"]


def test_cancelled_stream_aborts_and_frees_pages(engine):
    async def main():
        gen = engine.generate("long", "The quick brown fox", SamplingParams(max_tokens=200, **GREEDY))
        first = await gen.__anext__()
        assert not first.finished
        await gen.aclose()  # what a disconnecting HTTP client does
        return await _wait_idle(engine)

    stats = asyncio.run(main())
    assert stats["kv_pages_free"] == stats["kv_pages_total"]


def test_invalid_request_raises_and_the_engine_keeps_serving(engine):
    async def main():
        with pytest.raises(InvalidRequest, match="maximum context length"):
            await _collect(engine, "bad", list(range(3, 300)), SamplingParams())
        return await _collect(engine, "good", "Hello", SamplingParams(max_tokens=3, **GREEDY))

    _, tokens, _ = asyncio.run(main())
    assert len(tokens) == 3


def test_a_failing_request_leaves_the_others_running(engine, monkeypatch):
    original = OutputProcessor._apply

    def failing(self, req, sample, update):
        if req.request_id == "boom":
            raise RuntimeError("detokenizer exploded")
        return original(self, req, sample, update)

    monkeypatch.setattr(OutputProcessor, "_apply", failing)

    async def main():
        params = SamplingParams(max_tokens=8, **GREEDY)
        good = asyncio.create_task(_collect(engine, "ok", "Hello world", params))
        with pytest.raises(RequestFailed, match="detokenizer exploded"):
            async for _ in engine.generate("boom", "Hello world", params):
                pass
        return await good

    _, tokens, last = asyncio.run(main())
    assert len(tokens) == 8 and last.finished
    asyncio.run(_wait_idle(engine))


def test_overload_is_refused_fast(engine):
    async def main():
        params = SamplingParams(max_tokens=30, **GREEDY)
        gens = [engine.generate(f"o{i}", "Hello", params) for i in range(engine.max_in_flight)]
        firsts = [asyncio.create_task(g.__anext__()) for g in gens]
        await asyncio.sleep(0)  # let every generator register its stream
        with pytest.raises(EngineOverloaded):
            await engine.generate("one-too-many", "Hello", params).__anext__()
        await asyncio.gather(*firsts)
        for g in gens:
            await g.aclose()
        return await _wait_idle(engine)

    asyncio.run(main())


def test_stats_have_what_the_server_reports(engine):
    s = engine.stats()
    for key in ("running", "waiting", "kv_pages_total", "kv_pages_free", "prefix_cache_hit_rate", "compile_count",
                "generation_tokens_per_s", "generated_tokens"):
        assert key in s
    assert np.isfinite(s["generation_tokens_per_s"])


def test_a_failed_step_fails_its_requests_and_the_engine_recovers(engine, monkeypatch):
    runner = engine.engine.runner
    real_program = runner._program
    calls = {"n": 0}

    def failing_forward(*args, real):
        calls["n"] += 1
        # From the third call on (mid-generation, after a couple of good steps) until undone: a request that
        # reached the engine after the first failure fails at its own first step.
        if calls["n"] >= 3:
            raise RuntimeError("simulated device failure")
        return real(*args)

    def program(name, size):
        real = real_program(name, size)
        return functools.partial(failing_forward, real=real) if name == "forward" else real

    monkeypatch.setattr(runner, "_program", program)

    async def main():
        params = SamplingParams(max_tokens=20, **GREEDY)
        results = await asyncio.gather(*[_collect(engine, f"f{i}", "Hello world", params) for i in range(3)],
                                       return_exceptions=True)
        assert all(isinstance(r, RequestFailed) and "simulated device failure" in str(r) for r in results)
        monkeypatch.undo()
        return await _collect(engine, "after", "Hello world", params)

    _, tokens, last = asyncio.run(main())
    assert len(tokens) == 20 and last.finished
    asyncio.run(_wait_idle(engine))


def test_each_server_thread_has_its_own_tokenizer():
    """The engine thread decodes with the engine's tokenizer while server threads encode: never the same object
    (transformers 5's fast tokenizers raise "Already borrowed" when two threads share one)."""
    import threading
    import types

    from server.state import ServerConfig, ServerState

    engine_tokenizer = tiny.make_tokenizer(300)
    state = ServerState(ServerConfig())
    state.attach(types.SimpleNamespace(engine=types.SimpleNamespace(tokenizer=engine_tokenizer)), "tiny")
    seen, errors = {}, []
    text = "Ünïcödé tëxt, 日本語 and the quick brown fox " * 20
    expected = engine_tokenizer.encode(text)

    def work(name):
        try:
            tok = state.tokenizer
            assert tok is state.tokenizer  # one per thread, kept
            seen[name] = tok
            for _ in range(200):
                assert tok.encode(text) == expected
        except Exception as e:  # reported below: an assertion in a thread would not fail the test
            errors.append(e)

    def decode():
        for _ in range(400):
            engine_tokenizer.decode(expected)

    threads = [threading.Thread(target=work, args=(n,)) for n in "ab"] + [threading.Thread(target=decode)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({id(t) for t in [*seen.values(), engine_tokenizer]}) == 3
