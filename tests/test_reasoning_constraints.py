"""A reasoning parser never disables a constraint: every combination of parser (none / qwen3 / deepseek_r1), where
the prompt leaves the output (a think block opened, closed, or absent) and constraint (json_object, json_schema,
required tool, named tool), streamed and not, through the chat handler on a real engine with a tiny model.

The random model never closes a think block by itself, so requests carry a thinking budget: the forced
`</think>` is what lets an opened block end, and the grammar takes over after it.
"""

import asyncio
import json
import types

import pytest

import tiny
from jaxserve.async_engine import AsyncEngine
from jaxserve.engine import EngineConfig, LLMEngine
from jaxserve.text.reasoning import CLOSE, OPEN
from jaxserve.text.structured_output import GrammarState, StructuredOutput
from server import chat
from server.protocol import ChatCompletionRequest
from server.state import ServerConfig, ServerState

# The state is chosen by a template variable, as enable_thinking chooses it in Qwen3's and DeepSeek's templates.
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "<|im_start|>assistant\n{% if think == 'opened' %}<think>\n{% elif think == 'closed' %}"
            "<think>\n\n</think>\n\n{% endif %}")
CITY = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}}, "required": ["city"],
        "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": CITY}}
CONSTRAINTS = {
    "json_object": {"response_format": {"type": "json_object"}},
    "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": CITY}}},
    "required": {"tools": [TOOL], "tool_choice": "required", "parallel_tool_calls": False},
    "named": {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
}
BUDGET = 3


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    folder = tiny.make_checkpoint(tmp_path_factory.mktemp("reasoning"), "llama")
    engine = LLMEngine(str(folder), config=EngineConfig(max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64,
                                                        page_size=8, num_kv_pages=256, compile_cache_dir="",
                                                        warm_up=False), progress=False)
    s = ServerState(ServerConfig())
    s.attach(AsyncEngine(engine), "tiny")
    yield s
    s.engine.shutdown()


def _request(constraint: str, think: str, stream: bool) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "Weather?"}], chat_template=TEMPLATE,
                                 chat_template_kwargs={"think": think}, max_tokens=96, temperature=1.0, seed=11,
                                 thinking_token_budget=BUDGET, stream=stream, **CONSTRAINTS[constraint])


def _run(state, req) -> dict:
    """The message as a client sees it: {reasoning, content, calls: [(name, arguments)], finish}."""
    async def go():
        connected = types.SimpleNamespace(is_disconnected=lambda: asyncio.sleep(0, False))
        result = await chat.create_chat_completion(state, req, connected)
        if not req.stream:
            (c,) = result.choices
            m = c.message
            return {"reasoning": m.reasoning, "content": m.content, "finish": c.finish_reason,
                    "calls": [(t.function.name, t.function.arguments) for t in m.tool_calls or []]}
        reasoning, content, calls, finish = "", "", {}, None
        async for line in result:
            if line.startswith("data: [DONE]"):
                break
            (c,) = json.loads(line[len("data: "):])["choices"]
            d = c["delta"]
            reasoning += d.get("reasoning") or ""
            content += d.get("content") or ""
            for t in d.get("tool_calls") or []:
                name, args = calls.get(t["index"], ("", ""))
                calls[t["index"]] = (name + (t["function"].get("name") or ""), args + t["function"]["arguments"])
            finish = c["finish_reason"] or finish
        return {"reasoning": reasoning or None, "content": content or None, "finish": finish,
                "calls": [calls[i] for i in sorted(calls)]}

    return asyncio.run(go())


def _answer_is_valid(state, constraint: str, msg: dict) -> None:
    """The answer obeys the constraint from its first character: whole and valid when the model stopped, a valid
    prefix when max_tokens cut it."""
    engine = state.engine.engine
    if constraint == "named":
        (name, text), = msg["calls"]
        spec = StructuredOutput.from_schema(CITY)
        assert name == "get_weather"
    elif constraint == "required":
        (name, text), = msg["calls"]
        spec = StructuredOutput.from_schema(CITY)
        assert name == "get_weather" and msg["content"] is None
    else:
        text = msg["content"]
        spec = StructuredOutput(json_object=True) if constraint == "json_object" else StructuredOutput.from_schema(CITY)
    assert text and text.startswith("{")
    if msg["finish"] in ("stop", "tool_calls"):
        value = json.loads(text)
        assert isinstance(value, dict) and (constraint == "json_object" or value["city"] in ("Paris", "Rome", "Oslo"))
        return
    grammar = GrammarState(engine.grammars, spec)
    for t in engine.tokenizer.encode(text, add_special_tokens=False):
        grammar.accept(t)  # raises if the text leaves the grammar


@pytest.mark.parametrize("constraint", list(CONSTRAINTS))
@pytest.mark.parametrize("think", ["opened", "closed", "absent"])
@pytest.mark.parametrize("parser", [None, "qwen3", "deepseek_r1"])
def test_constraints_hold_with_every_reasoning_setup(state, parser, think, constraint):
    state.config.reasoning_parser = parser
    try:
        if parser is None:
            with pytest.raises(ValueError, match="needs a server started with --reasoning-parser"):
                _run(state, _request(constraint, think, False))
            req = _request(constraint, think, False).model_copy(update={"thinking_token_budget": None})
            whole = _run(state, req)
            streamed = _run(state, req.model_copy(update={"stream": True}))
        else:
            whole = _run(state, _request(constraint, think, False))
            streamed = _run(state, _request(constraint, think, True))
    finally:
        state.config.reasoning_parser = None
    assert streamed == whole  # the same seed: the stream adds up to exactly the whole answer
    _answer_is_valid(state, constraint, whole)
    if parser is None or think == "closed":
        assert whole["reasoning"] is None  # constrained from the first token
    elif think == "opened":
        assert whole["reasoning"]  # the budget's thought, split off as reasoning, then the answer
        assert OPEN not in whole["reasoning"] and CLOSE not in whole["reasoning"]
    else:  # the output could open a block: if it did, that is reasoning; the answer comes after it either way
        assert whole["reasoning"] is None or CLOSE not in whole["reasoning"]


def test_reasoning_effort_maps_to_the_switch_and_a_budget(state):
    def req(**kw):
        return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **kw)

    assert [req(reasoning_effort=e).thinking_budget() for e in ("minimal", "low", "medium", "high", "xhigh")] == [
        64, 256, 1024, 4096, 16384]
    assert req(reasoning_effort="none").template_kwargs() == {"enable_thinking": False, "reasoning_effort": "none"}
    assert req(reasoning_effort="high", chat_template_kwargs={"enable_thinking": False}).template_kwargs() == {
        "enable_thinking": False, "reasoning_effort": "high"}  # the request's own kwargs win
    assert req(reasoning_effort="low", thinking_token_budget=5).thinking_budget() == 5
    assert req().thinking_budget() is None and req().template_kwargs() is None
    # Through a template that reads enable_thinking: "none" closes the block, so the answer is constrained at once.
    template = TEMPLATE.replace("think == 'opened'", "enable_thinking").replace("think == 'closed'", "true")
    state.config.reasoning_parser = "qwen3"
    try:
        r = _request("json_schema", "", False).model_copy(update={
            "chat_template": template, "chat_template_kwargs": None, "thinking_token_budget": None})
        off = _run(state, r.model_copy(update={"reasoning_effort": "none"}))
        on = _run(state, r.model_copy(update={"reasoning_effort": "minimal"}))
    finally:
        state.config.reasoning_parser = None
    assert off["reasoning"] is None and json.loads(off["content"])["city"] in ("Paris", "Rome", "Oslo")
    assert on["reasoning"]  # opened by the template; minimal's 64-token budget ends it
    assert json.loads(on["content"])["city"] in ("Paris", "Rome", "Oslo")
