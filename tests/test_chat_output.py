"""Assistant messages from generated text: reasoning, tool calls (parsed or forced), and stream deltas."""

import json

import pytest

from server.chat_output import ChatPlan, StreamShaper, final_message

CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
PLANS = {
    "plain": ChatPlan(),
    "auto": ChatPlan(tool_parser="hermes"),
    "auto_reasoning": ChatPlan(tool_parser="hermes", reasoning_parser="qwen3"),
    "named": ChatPlan(forced={"type": "function", "function": {"name": "get_weather"}}),
    "required": ChatPlan(forced="required"),
    "reasoning_hidden": ChatPlan(reasoning_parser="qwen3", include_reasoning=False),
    "whole_answer": ChatPlan(tool_parser="hermes", tool_names=("get_weather", "ping")),
    "whole_answer_list": ChatPlan(tool_parser="mistral", tool_names=("get_weather", "ping")),
    "whole_answer_undeclared": ChatPlan(tool_parser="hermes", tool_names=("ping",)),
}
TEXTS = {
    "plain": "Hello there.",
    "auto": "Let me look. " + CALL,
    "auto_reasoning": "<think>User wants weather.</think>" + CALL,
    "named": '{"city": "Paris"}',
    "required": '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "ping", "parameters": {}}]',
    "reasoning_hidden": "<think>secret</think>The answer.",
    # Small models answer with a bare call: exactly a declared tool's call is that call, whatever the parser.
    "whole_answer": ' {"name": "get_weather", "arguments": {"city": "Paris"}}',
    "whole_answer_list": '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "ping"}]',
    "whole_answer_undeclared": '{"name": "get_weather", "arguments": {"city": "Paris"}}',
}


def _stream(plan, text, step):
    shaper = StreamShaper(plan)
    pieces = [text[i:i + step] for i in range(0, len(text), step)] or [""]
    deltas = []
    for i, piece in enumerate(pieces):
        deltas += shaper.feed(piece, final=i == len(pieces) - 1)
    content = "".join(d.get("content", "") for d in deltas)
    thought = "".join(d.get("reasoning_content", "") for d in deltas)
    calls = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            entry = calls.setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
            if "id" in tc:
                assert entry["id"] is None  # id and name come once, first
                entry["id"], entry["name"] = tc["id"], tc["function"]["name"]
            entry["arguments"] += tc["function"].get("arguments", "")
    return content, thought, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("case", list(PLANS))
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_stream_matches_final_message(case, step):
    plan, text = PLANS[case], TEXTS[case]
    message, finish = final_message(plan, text, "stop")
    content, thought, calls = _stream(plan, text, step)
    assert (content.strip() or None) == (message["content"].strip() if message["content"] else None)
    assert (thought or None) == message["reasoning_content"]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]]
    assert all(c["id"].startswith("call_") for c in calls)
    assert finish == ("tool_calls" if message["tool_calls"] else "stop")


@pytest.mark.parametrize("step", [1, 1000])
def test_parallel_tool_calls_false_keeps_one_call(step):
    plan = ChatPlan(tool_parser="hermes", parallel_tool_calls=False)
    text = CALL + '<tool_call>{"name": "ping", "arguments": {}}</tool_call>'
    message, finish = final_message(plan, text, "stop")
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"] and finish == "tool_calls"
    _, _, calls = _stream(plan, text, step)
    assert [c["name"] for c in calls] == ["get_weather"]


def test_specific_shapes():
    msg, finish = final_message(PLANS["auto"], TEXTS["auto"], "stop")
    assert msg["content"] == "Let me look." and finish == "tool_calls"
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    msg, _ = final_message(PLANS["required"], TEXTS["required"], "stop")
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["get_weather", "ping"]
    assert msg["tool_calls"][1]["function"]["arguments"] == "{}"  # a tool without parameters gets "{}"
    msg, _ = final_message(PLANS["reasoning_hidden"], TEXTS["reasoning_hidden"], "stop")
    assert msg["reasoning_content"] is None and msg["content"] == "The answer."
    msg, finish = final_message(PLANS["named"], '{"city": "Par', "length")  # cut short by max_tokens
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]] == [
        ("get_weather", '{"city": "Par')] and msg["content"] is None and finish == "length"


@pytest.mark.parametrize("step", [1, 1000])
def test_required_call_cut_off_by_max_tokens_keeps_the_arguments_so_far(step):
    text = '[{"name": "ping", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Pa'
    msg, finish = final_message(PLANS["required"], text, "length")
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]] == [
        ("ping", "{}"), ("get_weather", '{"city": "Pa')] and msg["content"] is None and finish == "length"
    content, _, calls = _stream(PLANS["required"], text, step)
    assert content == "" and [(c["name"], c["arguments"]) for c in calls] == [
        ("ping", "{}"), ("get_weather", '{"city": "Pa')]
    msg, _ = final_message(PLANS["required"], "[", "length")  # cut before the first call's name
    assert msg["tool_calls"] == [] and msg["content"] is None


def test_reasoning_sent_under_both_names():
    msg, _ = final_message(ChatPlan(reasoning_parser="qwen3"), "<think>hmm</think>Yes.", "stop")
    assert msg == {"content": "Yes.", "tool_calls": [], "reasoning": "hmm", "reasoning_content": "hmm"}
    shaper = StreamShaper(ChatPlan(reasoning_parser="qwen3"))
    deltas = shaper.feed("<think>hmm</think>", final=False) + shaper.feed("Yes.", final=True)
    thought = [d for d in deltas if "content" not in d]
    assert thought and all(list(d) == ["reasoning", "reasoning_content"] and d["reasoning"] == d["reasoning_content"]
                           for d in thought)
    assert "".join(d["reasoning"] for d in thought) == "hmm"


def test_whole_answer_calls_only_for_declared_tools_and_exact_json():
    msg, finish = final_message(PLANS["whole_answer"], TEXTS["whole_answer"], "stop")
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]] == [
        ("get_weather", '{"city": "Paris"}')] and msg["content"] is None and finish == "tool_calls"
    for text in [TEXTS["whole_answer"] + " Done.", '{"name": "get_weather", "arguments": 5}', '{"x": 1}']:
        msg, finish = final_message(PLANS["whole_answer"], text, "stop")
        assert msg["tool_calls"] == [] and msg["content"] == text.strip() and finish == "stop"
    msg, _ = final_message(PLANS["whole_answer_undeclared"], TEXTS["whole_answer_undeclared"], "stop")
    assert msg["tool_calls"] == [] and msg["content"] == TEXTS["whole_answer_undeclared"]
