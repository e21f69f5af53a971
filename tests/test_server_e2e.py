"""End to end over HTTP with the real default model (SmolLM2-135M-Instruct): answers, and the guarantees of
structured output and forced tool calls at temperature 1 over 20 seeds, streaming and not."""

import asyncio
import json

import jsonschema
import openai
import pytest

from serving import Server

SEEDS = range(20)
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 15}, "maxItems": 3}},
    "required": ["name", "age", "hobbies"]}
# strict: the guarantee under test (every forced call completes and validates) is OpenAI's strict mode; without it
# objects stay open and a weak model at temperature 1 may invent keys until max_tokens.
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "strict": True,
                                      "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "The current time", "strict": True}},
]
PARAMS = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object", "properties": {}} for t in TOOLS}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # The same shapes as the quickstart notebook, so the persistent compile cache serves both.
    s = Server(None, "--max-model-len", "2048", "--max-num-batched-tokens", "128",
               log_path=tmp_path_factory.mktemp("logs") / "smollm2.log").wait_ready()
    yield s
    assert s.stop() == 0


def _run(server, one):
    """Runs one(client, seed) for every seed concurrently (the client lives in this event loop)."""
    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*[one(client, seed) for seed in SEEDS])

    return asyncio.run(main())


def test_greedy_answer_plain_and_streamed(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    plain = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, temperature=0,
                                           max_tokens=40)
    assert "Paris" in plain.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=messages, temperature=0, max_tokens=40, stream=True) if c.choices)
    assert streamed == plain.choices[0].message.content


async def _collect_stream(stream):
    content, calls, finish = "", {}, None
    async for chunk in stream:
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"name": None, "arguments": "", "id": None})
                if tc.id:
                    entry["id"], entry["name"] = tc.id, tc.function.name
                entry["arguments"] += tc.function.arguments or ""
            finish = ch.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_always_validates(server, stream):
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    messages = [{"role": "user", "content": "Invent a person and describe them as JSON."}]

    async def one(aclient, seed):
        kw = dict(model="SmolLM2-135M-Instruct", messages=messages, response_format=rf, temperature=1.0, seed=seed,
                  max_tokens=300)
        if stream:
            content, _, finish = await _collect_stream(await aclient.chat.completions.create(stream=True, **kw))
            return content, finish
        r = await aclient.chat.completions.create(**kw)
        return r.choices[0].message.content, r.choices[0].finish_reason

    for content, finish in _run(server, one):
        assert finish == "stop"
        jsonschema.validate(json.loads(content), PERSON)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", "get_weather"])
def test_forced_tool_calls_are_always_valid(server, stream, choice):
    tool_choice = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    messages = [{"role": "user", "content": "What's the weather like in Paris, and what time is it?"}]

    async def one(aclient, seed):
        kw = dict(model="SmolLM2-135M-Instruct", messages=messages, tools=TOOLS, tool_choice=tool_choice,
                  temperature=1.0, seed=seed, max_tokens=300)
        if stream:
            _, calls, finish = await _collect_stream(await aclient.chat.completions.create(stream=True, **kw))
            return calls, finish
        r = await aclient.chat.completions.create(**kw)
        msg = r.choices[0].message
        return [{"name": c.function.name, "arguments": c.function.arguments, "id": c.id}
                for c in msg.tool_calls or []], r.choices[0].finish_reason

    for calls, finish in _run(server, one):
        assert finish == "tool_calls" and calls
        if choice != "required":
            assert [c["name"] for c in calls] == [choice]
        assert len({c["id"] for c in calls}) == len(calls) and all(c["id"].startswith("call_") for c in calls)
        for c in calls:
            jsonschema.validate(json.loads(c["arguments"]), PARAMS[c["name"]])
