"""Stream shape with n > 1: each choice gets its deltas once, one finish chunk, nothing after it.

The engine reports every sample of a request on each step, finished ones included; the stream handlers are
driven here by a scripted engine so the finishing steps are exact.
"""

import asyncio
import json
import types

from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.sampling_params import SamplingParams
from server import chat, completions
from server.chat_output import ChatPlan
from server.protocol import ChatCompletionRequest, CompletionRequest


def _script(texts: list[list[str]]) -> list[RequestOutput]:
    """texts[i]: sample i's text per step, as delta outputs; a sample stops after its last piece (length) and keeps
    being reported, with its finish_reason and no new text, as the engine does."""
    steps = max(map(len, texts))
    outs = []
    for step in range(steps):
        choices = []
        for i, pieces in enumerate(texts):
            done = step >= len(pieces) - 1
            new = pieces[step] if step < len(pieces) else ""
            choices.append(CompletionOutput(i, new, [0] if new else [], "length" if done else None))
        outs.append(RequestOutput("r", None, [1], choices, finished=step == steps - 1))
    return outs


def _state(script):
    async def generate(request_id, prompt, params, priority=0):
        for out in script:
            yield out

    return types.SimpleNamespace(generate=generate, model_name="m", fingerprint="fp")


def _collect(stream) -> list[dict]:
    async def run():
        return [item async for item in stream]

    lines = asyncio.run(run())
    assert lines[-1] == "data: [DONE]\n\n"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


TEXTS = [["a", "b", "c", "d"], ["x"], ["p", "q"]]  # three samples finishing at steps 4, 1 and 2


def test_chat_n3_each_choice_finishes_once():
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], n=3, stream=True)
    chunks = _collect(chat._stream(_state(_script(TEXTS)), req, ChatPlan(), "id", [1], SamplingParams(n=3), ""))
    assert all(len(c["choices"]) == 1 for c in chunks)
    per_choice = {}
    for c in chunks:
        (ch,) = c["choices"]
        per_choice.setdefault(ch["index"], []).append((ch["delta"], ch["finish_reason"]))
    role = ({"role": "assistant", "content": ""}, None)
    assert per_choice == {
        0: [role, ({"content": "a"}, None), ({"content": "b"}, None), ({"content": "c"}, None),
            ({"content": "d"}, None), ({}, "length")],
        1: [role, ({"content": "x"}, None), ({}, "length")],
        2: [role, ({"content": "p"}, None), ({"content": "q"}, None), ({}, "length")],
    }


def test_chat_required_tool_n2_each_call_once():
    plan = ChatPlan(forced="required")
    texts = [['[{"name": "f", ', '"parameters": {}}]'], ['[{"name": "f", "parameters": {}}]']]
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], n=2, stream=True)
    chunks = _collect(chat._stream(_state(_script(texts)), req, plan, "id", [1], SamplingParams(n=2), ""))
    calls = {}
    finishes = {}
    for c in chunks:
        (ch,) = c["choices"]
        for tc in ch["delta"].get("tool_calls", []):
            calls.setdefault(ch["index"], []).append(tc)
        if ch["finish_reason"]:
            finishes.setdefault(ch["index"], []).append(ch["finish_reason"])
    assert sorted(calls) == [0, 1]
    for index, deltas in calls.items():
        head, = [d for d in deltas if "id" in d]  # one call, one id
        assert head["function"] == {"name": "f", "arguments": ""} and head["index"] == 0
        assert "".join(d["function"].get("arguments", "") for d in deltas) == "{}"
    assert finishes == {0: ["length"], 1: ["length"]}


def test_completions_n3_one_choice_per_chunk_and_one_finish():
    req = CompletionRequest(prompt="hi", n=3, stream=True)
    state = _state(_script(TEXTS))
    chunks = _collect(completions._stream(state, req, "id", [[1]], [SamplingParams(n=3)], [""]))
    assert [[(ch["index"], ch["text"], ch["finish_reason"]) for ch in c["choices"]] for c in chunks] == [
        [(0, "a", None)], [(1, "x", "length")], [(2, "p", None)],
        [(0, "b", None)], [(2, "q", "length")],
        [(0, "c", None)],
        [(0, "d", "length")],
    ]


def test_samples_are_admitted_with_sample_0(tmp_path):
    """Samples 1..n-1 join the queue's head once sample 0 has computed the prompt, ahead of later requests."""
    import tiny
    from jaxserve.engine import EngineConfig, LLMEngine

    folder = tiny.make_checkpoint(tmp_path, "llama")
    engine = LLMEngine(str(folder), config=EngineConfig(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=32,
                                                        page_size=8, num_kv_pages=64, compile_cache_dir="",
                                                        warm_up=False), progress=False)
    prompt = list(range(10, 30))  # 20 tokens: two full pages for the siblings to share, four to compute each
    greedy = SamplingParams(n=3, temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("A", prompt, greedy)
    for name in "BCD":
        engine.add_request(name, [t + 1 for t in prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    engine.step()  # A0's prompt (20) and the first 12 tokens of B's
    engine.step()
    # Right behind the sequences already running, before C and D, which waited since before the siblings.
    assert [(s.request_id, s.index) for s in engine.scheduler.running] == [
        ("A", 0), ("B", 0), ("A", 1), ("A", 2), ("C", 0), ("D", 0)]
    outs = {}
    while engine.has_unfinished():
        for out in engine.step():
            outs[out.request_id] = out
    texts = [o.token_ids for o in outs["A"].outputs]
    assert texts[0] == texts[1] == texts[2] and len(texts[0]) == 4


def test_non_streaming_clients_that_leave_free_everything(tmp_path):
    """Many non-streaming requests whose clients time out: all are aborted and their pages freed within seconds."""
    import re
    import time

    import httpx

    import tiny
    from serving import Server

    folder = tiny.make_checkpoint(tmp_path / "model", "llama")
    server = Server(str(folder), "--max-model-len", "1024", "--max-num-seqs", "4", "--max-waiting-requests", "32",
                    log_path=tmp_path / "server.log").wait_ready()

    def metric(text, name):
        return float(re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M).group(1))

    async def leave_early():
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 900, "ignore_eos": True}
        async with httpx.AsyncClient(timeout=0.5) as c:
            results = await asyncio.gather(*[c.post(server.url + "/v1/chat/completions", json=body)
                                             for _ in range(20)], return_exceptions=True)
        assert all(isinstance(r, httpx.ReadTimeout) for r in results)

    try:
        asyncio.run(leave_early())
        deadline = time.monotonic() + 5
        while True:
            text = httpx.get(server.url + "/metrics").text
            left = [metric(text, f"jaxserve_num_requests_{k}") for k in ("running", "waiting")]
            if left == [0, 0] and metric(text, "jaxserve_kv_cache_usage_perc") == 0:
                break
            assert time.monotonic() < deadline, f"still running, waiting: {left}"
            time.sleep(0.1)
    finally:
        assert server.stop() == 0


def test_multi_prompt_completion_that_fails_for_one_prompt_cancels_the_others():
    """Prompt 1 fails at once; prompt 0's generation (which would run long) is closed, not left running."""
    from jaxserve.async_engine import RequestFailed

    closed = []

    async def generate(request_id, prompt, params, priority=0):
        if request_id.endswith("-1"):
            raise RequestFailed("boom")
        try:
            while True:
                await asyncio.sleep(0.01)
                yield RequestOutput(request_id, None, prompt, [CompletionOutput(0, "", [], None)], finished=False)
        finally:
            closed.append(request_id)

    tokenizer = types.SimpleNamespace(encode=lambda text, add_special_tokens=True: [1, 2], decode=lambda ids: "x")
    engine = types.SimpleNamespace(validate=lambda ids, p: None, max_model_len=100)
    state = types.SimpleNamespace(generate=generate, model_name="m", fingerprint="fp", tokenizer=tokenizer,
                                  check_model=lambda name: None, check_grammar_size=lambda spec: None,
                                  check_request=lambda ids, p, priority: None, default_max_tokens=lambda n: 16,
                                  sampling_defaults={}, engine=types.SimpleNamespace(engine=engine))
    connected = types.SimpleNamespace(is_disconnected=lambda: asyncio.sleep(0, False))
    req = CompletionRequest(prompt=["a", "b"], max_tokens=5)

    async def run():
        try:
            await completions.create_completion(state, req, connected)
        except RequestFailed:
            await asyncio.sleep(0.05)  # let the cancelled task finish closing its generator
            return "failed"

    assert asyncio.run(run()) == "failed"
    assert len(closed) == 1 and closed[0].endswith("-0")  # prompt 0's stream was closed, not left running
