"""The HTTP server, as a real process on 127.0.0.1, driven by the openai SDK and by raw HTTP (tiny model)."""

import asyncio
import json
import re
import subprocess
import sys
import time

import httpx
import openai
import pytest

import tiny
from serving import Server

KEY = "test-key-123"
MESSAGES = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tiny.make_checkpoint(tmp_path_factory.mktemp("srv"), "llama")
    s = Server(str(folder), "--max-model-len", "1024", "--max-num-seqs", "4", "--max-num-batched-tokens", "32",
               "--max-waiting-requests", "4", "--api-key", KEY, "--served-model-name", "tiny",
               log_path=tmp_path_factory.mktemp("logs") / "server.log").wait_ready()
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def _post(server, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kw)


def _metric(server, name) -> float:
    text = httpx.get(server.url + "/metrics").text
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1))


def _wait_idle(server):
    for _ in range(100):
        if _metric(server, "jaxserve_num_requests_running") == 0 and _metric(server, "jaxserve_kv_cache_usage_perc") == 0:
            return
        time.sleep(0.05)
    raise AssertionError("requests still running or KV pages still held")


def test_info_endpoints(server):
    assert httpx.get(server.url + "/health").status_code == 200  # open without the key
    assert httpx.get(server.url + "/version").json()["version"]
    models = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 1024
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/tokenize", "/metrics"} <= set(spec["paths"])
    assert httpx.get(server.url + "/docs").status_code == 200


def test_api_key(server):
    assert _post(server, "/v1/chat/completions", {"messages": MESSAGES}, key=None).status_code == 401
    r = _post(server, "/v1/chat/completions", {"messages": MESSAGES}, key="wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == 401
    assert _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2}).status_code == 200


def test_chat_completion_shape(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "tiny" and r.created > 0
    assert r.system_fingerprint
    c = r.choices[0]
    assert c.index == 0 and c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason == "length" and c.message.tool_calls == []
    assert r.usage.completion_tokens == 5 and r.usage.total_tokens == r.usage.prompt_tokens + 5
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_streaming_framing_raw(server):
    body = {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    finishing = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finishing) == 1 and finishing[0]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    whole = _post(server, "/v1/chat/completions", {**body, "stream": False, "stream_options": None}).json()
    assert streamed == whole["choices"][0]["message"]["content"]


def test_n_choices_interleave_when_streaming(client):
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, n=2, stream=True,
                                            temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    indices, finished = [], set()
    for chunk in stream:
        for ch in chunk.choices:
            indices.append(ch.index)
            if ch.finish_reason:
                finished.add(ch.index)
    assert set(indices) == {0, 1} and finished == {0, 1}
    assert indices != sorted(indices)  # interleaved, not one choice after the other


def test_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, temperature=0, logprobs=True,
                                       top_logprobs=4)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 4 and isinstance(item.bytes, list)
        assert item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)  # greedy: the chosen token is the top


def test_streamed_logprobs_arrive_with_their_text(client):
    """Clients zip delta.content with logprobs.content: in every chunk the logprob tokens join to its content, also
    while a stop string holds text back; nothing else carries text or tokens."""
    kw = dict(model="tiny", max_tokens=24, temperature=1.0, seed=5, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(messages=MESSAGES, **kw).choices[0].message.content
    stop = whole[10:13]
    for stops in (["qqq never"], [stop]):
        chunks = list(client.chat.completions.create(messages=MESSAGES, stream=True, logprobs=True, top_logprobs=1,
                                                     stop=stops, **kw))
        streamed = ""
        for c in chunks[1:]:  # the first chunk carries the role
            (ch,) = c.choices
            tokens = "".join(t.token for t in ch.logprobs.content) if ch.logprobs else ""
            assert tokens == (ch.delta.content or "")
            streamed += tokens
        assert streamed == (whole if stops[0] != stop else whole[: whole.index(stop)])
        completion = list(client.completions.create(prompt="The quick brown", stream=True, logprobs=1, stop=stops,
                                                    **kw))
        for c in completion:
            (ch,) = c.choices
            assert "".join(ch.logprobs.tokens) == ch.text


def test_seed_reproducible_and_stop(client):
    def run(seed, **kw):
        return client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=1.0,
                                              seed=seed, extra_body={"ignore_eos": True}, **kw).choices[0]

    a, b, c = run(7), run(7), run(8)
    assert a.message.content == b.message.content != c.message.content
    text = a.message.content
    stop = text[4:7]
    stopped = run(7, stop=[stop])
    assert stopped.message.content == text[: text.index(stop)] and stopped.finish_reason == "stop"


def test_max_completion_tokens_and_unknown_fields(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=3, temperature=0,
                                       extra_body={"ignore_eos": True, "some_future_field": {"x": 1}})
    assert r.usage.completion_tokens == 3


def test_completions(client, server):
    r = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=4, temperature=0, echo=True,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.choices[0].text.startswith("The quick brown")
    r = client.completions.create(model="tiny", prompt=["one", "two"], max_tokens=2, n=2, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and r.usage.completion_tokens == 8
    ids = _post(server, "/tokenize", {"prompt": "hello world"}).json()["tokens"]
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=2, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    assert len(r.choices[0].logprobs.tokens) == 2 and len(r.choices[0].logprobs.top_logprobs[0]) == 2
    stream = client.completions.create(model="tiny", prompt="hi", max_tokens=3, stream=True, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert len([c for c in stream if c.choices and c.choices[0].text is not None]) >= 1


def test_tokenize_detokenize(server):
    r = _post(server, "/tokenize", {"prompt": "Hello world!"}).json()
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 1024
    assert _post(server, "/detokenize", {"tokens": r["tokens"]}).json()["prompt"] == "Hello world!"
    chat = _post(server, "/tokenize", {"messages": MESSAGES}).json()
    assert chat["count"] > r["count"]
    assert _post(server, "/detokenize", {"tokens": [10**9]}).status_code == 400


@pytest.mark.parametrize("body,status,needle", [
    ({"messages": MESSAGES, "temperature": 3}, 400, "temperature"),
    ({"messages": MESSAGES, "top_p": 0}, 400, "top_p"),
    ({"messages": MESSAGES, "n": 0}, 400, "n"),
    ({"messages": MESSAGES, "logprobs": True, "top_logprobs": 30}, 400, "top_logprobs"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "word " * 3000}]}, 400, "maximum context length is 1024"),
    ({"messages": MESSAGES, "max_tokens": 10**9}, 400, "maximum context length"),
    ({"messages": MESSAGES, "model": "gpt-9"}, 404, "gpt-9"),
    ({"messages": MESSAGES, "logit_bias": {"99999999": 5}}, 400, "token ids"),
    ({"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}},
     400, "structured output"),
])
def test_errors_have_openai_shape(server, body, status, needle):
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert needle in err["message"] or needle == err["param"] or needle in (err["param"] or "")


def test_malformed_json_is_400(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"messages": [', timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_disconnect_frees_pages(server):
    body = {"messages": MESSAGES, "max_tokens": 950, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        for line in r.iter_lines():
            if '"content"' in line:
                break  # leave mid-stream
    _wait_idle(server)

    async def leave_early():  # a non-streaming client that gives up
        async with httpx.AsyncClient(timeout=0.3) as c:
            with pytest.raises(httpx.ReadTimeout):
                await c.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                             json={**body, "stream": False})

    asyncio.run(leave_early())
    _wait_idle(server)


def test_overload_gets_429_fast_and_accepted_ones_finish(server):
    async def main():
        async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as c:
            body = {"messages": MESSAGES, "max_tokens": 40, "ignore_eos": True}
            return await asyncio.gather(*[c.post(server.url + "/v1/chat/completions", json=body) for _ in range(16)])

    responses = asyncio.run(main())
    codes = [r.status_code for r in responses]
    assert codes.count(429) >= 1 and set(codes) <= {200, 429}
    assert codes.count(200) >= 4  # max_num_seqs + waiting room were served
    assert all(r.json()["choices"][0]["finish_reason"] == "length" for r in responses if r.status_code == 200)
    assert "Retry-After" in next(r for r in responses if r.status_code == 429).headers


def test_metrics(server):
    text = httpx.get(server.url + "/metrics").text
    for family in ["jaxserve_requests_total", "jaxserve_time_to_first_token_seconds_bucket",
                   "jaxserve_inter_token_latency_seconds_bucket", "jaxserve_e2e_request_latency_seconds_bucket",
                   "jaxserve_prompt_tokens_total", "jaxserve_generation_tokens_total", "jaxserve_num_requests_running",
                   "jaxserve_num_requests_waiting", "jaxserve_kv_cache_usage_perc", "jaxserve_prefix_cache_hit_rate",
                   "jaxserve_compile_count"]:
        assert family in text
    assert re.search(r'jaxserve_requests_total\{endpoint="/v1/chat/completions",status="200"\} [1-9]', text)
    assert re.search(r'jaxserve_requests_total\{endpoint="/v1/chat/completions",status="401"\} [1-9]', text)


def test_no_key_or_prompt_text_in_the_log(server, client):
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "my secret zebra"}],
                                   max_tokens=2)
    log = server.log()
    assert "request chatcmpl-" in log  # the INFO request lines are there...
    assert KEY not in log and "zebra" not in log  # ...without the key or any prompt text


def test_cors_is_off_by_default(server):
    r = httpx.options(server.url + "/v1/models", headers={"Origin": "http://evil.example",
                                                           "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in r.headers


def test_chat_command_against_the_server(server):
    r = subprocess.run([sys.executable, "-m", "server.cli", "chat", "--url", server.url + "/v1", "--api-key", KEY,
                        "--max-tokens", "4"], input="Hello\n/exit\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and len(r.stdout.splitlines()) >= 2


def test_node_openai_package(server, tmp_path):
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "openai@^4"], cwd=node_dir, check=True,
                   timeout=300, capture_output=True)
    script = node_dir / "check.mjs"
    script.write_text("""
import OpenAI from "openai";
const client = new OpenAI({ baseURL: process.env.BASE_URL, apiKey: process.env.API_KEY });
const r = await client.chat.completions.create({ model: "tiny", messages: [{ role: "user", content: "Hi" }],
  max_tokens: 4, temperature: 0, ignore_eos: true });
const stream = await client.chat.completions.create({ model: "tiny", messages: [{ role: "user", content: "Hi" }],
  max_tokens: 4, temperature: 0, ignore_eos: true, stream: true });
let text = "";
for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? "";
console.log(JSON.stringify({ plain: r.choices[0].message.content, streamed: text, usage: r.usage }));
""")
    out = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/usr/local/bin", "BASE_URL": server.url + "/v1", "API_KEY": KEY})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["plain"] == result["streamed"] and result["usage"]["completion_tokens"] == 4


def test_sigterm_drains_then_exits_zero(tmp_path):
    folder = tiny.make_checkpoint(tmp_path / "m", "llama")
    s = Server(str(folder), "--max-model-len", "1024", "--max-num-batched-tokens", "32", "--drain-timeout", "20",
               log_path=tmp_path / "drain.log")
    first = None
    while first is None:  # the HTTP server is up before the model: its first answers are "not ready yet"
        try:
            first = httpx.get(s.url + "/health", timeout=2)
        except httpx.HTTPError:
            time.sleep(0.05)
    assert first.status_code == 503 and "not ready" in first.json()["error"]["message"]
    s.wait_ready()
    results = {}

    def long_request():
        results["r"] = httpx.post(s.url + "/v1/chat/completions", timeout=60, json={
            "messages": MESSAGES, "max_tokens": 150, "ignore_eos": True})

    import threading

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(1.0)
    s.proc.send_signal(15)
    time.sleep(0.3)
    refused = None
    try:
        refused = httpx.post(s.url + "/v1/chat/completions", json={"messages": MESSAGES}, timeout=5).status_code
    except httpx.HTTPError:
        refused = "connection refused"
    t.join(60)
    assert refused in (503, "connection refused")
    assert results["r"].status_code == 200 and results["r"].json()["usage"]["completion_tokens"] == 150
    assert s.proc.wait(timeout=60) == 0
    assert "draining" in s.log()
