"""/metrics under vLLM's names and labels, with exact counts after known requests (tiny model, real server)."""

import asyncio
import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import tiny
from jaxserve.async_engine import EngineOverloaded, RequestFailed
from jaxserve.engine import InvalidRequest
from jaxserve.outputs import CompletionOutput, RequestOutput
from serving import Server
from server.metrics import Metrics

NAME = "tiny-metrics"
LABELS = {"model_name": NAME, "engine": "0"}
PAGE = 16  # the engine's default page size
PROMPT = list(range(20, 60))  # 40 token ids: two full pages can be reused by a later identical prompt


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tiny.make_checkpoint(tmp_path_factory.mktemp("metrics"), "llama")
    s = Server(str(folder), "--max-model-len", "512", "--max-num-seqs", "4", "--served-model-name", NAME,
               log_path=tmp_path_factory.mktemp("logs") / "server.log").wait_ready()
    yield s
    assert s.stop() == 0


def _scrape(server) -> dict[str, dict]:
    """{sample name: {frozen labels: value}} parsed by prometheus_client's own parser."""
    samples: dict[str, dict] = {}
    for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
        for s in family.samples:
            samples.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return samples


def _vllm(samples, name, **extra) -> float:
    return samples[name][frozenset({**LABELS, **extra}.items())]


def _complete(server, prompt, max_tokens, **body) -> dict:
    r = httpx.post(server.url + "/v1/completions", timeout=120, json={
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **body})
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def _stream_chat(server, n, max_tokens) -> tuple[int, int]:
    """(prompt tokens, completion tokens) of a streamed chat request."""
    body = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": max_tokens, "n": n,
            "temperature": 1.0, "seed": 1, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    usage = chunks[-1]["usage"]
    return usage["prompt_tokens"], usage["completion_tokens"]


def _idle(server):
    for _ in range(200):
        samples = _scrape(server)
        if _vllm(samples, "vllm:num_requests_running") == 0 and _vllm(samples, "vllm:kv_cache_usage_perc") == 0:
            return samples
        time.sleep(0.05)
    raise AssertionError("requests still running or KV pages still held")


def test_vllm_names_and_exact_counts(server):
    before = _scrape(server)
    assert _vllm(before, "vllm:prompt_tokens_total") == 0 and _vllm(before, "vllm:prefix_cache_queries_total") == 0
    assert _vllm(before, "vllm:kv_cache_usage_perc") == 0 and _vllm(before, "vllm:num_requests_waiting") == 0

    # The same 40-token prompt twice: the second reuses the first's two full pages (the last token is always
    # computed, so 39 usable tokens hold 2 pages of 16).
    first = _complete(server, PROMPT, 5)
    second = _complete(server, PROMPT, 3)
    assert (first["prompt_tokens"], first["completion_tokens"], second["completion_tokens"]) == (40, 5, 3)
    samples = _idle(server)
    assert _vllm(samples, "vllm:prefix_cache_queries_total") == 80
    assert _vllm(samples, "vllm:prefix_cache_hits_total") == 2 * PAGE

    prompt_tokens, completion_tokens = _stream_chat(server, n=2, max_tokens=4)
    assert completion_tokens == 8
    samples = _idle(server)
    assert _vllm(samples, "vllm:prompt_tokens_total") == 40 + 40 + prompt_tokens
    assert _vllm(samples, "vllm:generation_tokens_total") == 5 + 3 + 8
    assert samples["jaxserve_prompt_tokens_total"][frozenset()] == 40 + 40 + prompt_tokens
    assert samples["jaxserve_generation_tokens_total"][frozenset()] == 5 + 3 + 8
    # One TTFT and one end-to-end latency per request; one inter-token gap between consecutive tokens of a sample.
    assert _vllm(samples, "vllm:time_to_first_token_seconds_count") == 3
    assert _vllm(samples, "vllm:e2e_request_latency_seconds_count") == 3
    assert _vllm(samples, "vllm:inter_token_latency_seconds_count") == (5 - 1) + (3 - 1) + 2 * (4 - 1)
    assert samples["jaxserve_inter_token_latency_seconds_count"][frozenset()] == 4 + 2 + 6
    # vLLM's buckets: the histograms' largest finite bounds are theirs.
    assert _vllm(samples, "vllm:time_to_first_token_seconds_bucket", le="2560.0") == 3
    assert _vllm(samples, "vllm:inter_token_latency_seconds_bucket", le="80.0") == 12
    assert _vllm(samples, "vllm:e2e_request_latency_seconds_bucket", le="7680.0") == 3
    # Every sample finished by length (1 + 1 + 2 choices); the other reasons exist at zero, as in vLLM.
    success = {reason: _vllm(samples, "vllm:request_success_total", finished_reason=reason)
               for reason in ("stop", "length", "abort", "error")}
    assert success == {"stop": 0, "length": 4, "abort": 0, "error": 0}
    # Step time split into host work and waiting for the device (the overlap shows as the first shrinking).
    step = {k: samples[f"jaxserve_step_{k}_seconds_total"][frozenset()] for k in ("host", "device")}
    assert [before[f"jaxserve_step_{k}_seconds_total"][frozenset()] for k in step] == [0, 0]
    assert step["host"] > 0 and step["device"] > 0


def test_a_client_that_leaves_aborts_its_request(server):
    before = _scrape(server)
    body = {"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        next(line for line in r.iter_lines() if line.startswith("data: {"))  # then hang up mid-stream
    for _ in range(200):
        after = _scrape(server)
        if _vllm(after, "vllm:request_success_total", finished_reason="abort") == 1:
            break
        time.sleep(0.05)
    assert _vllm(after, "vllm:request_success_total", finished_reason="abort") == 1
    assert _vllm(after, "vllm:e2e_request_latency_seconds_count") == \
        _vllm(before, "vllm:e2e_request_latency_seconds_count") + 1


def _output(*deltas, finished=()) -> RequestOutput:
    """One step's output: deltas[i] new tokens for sample i; the samples in `finished` stop at this step."""
    return RequestOutput("r", None, [1, 2], [CompletionOutput(i, "", [7] * k, "stop" if i in finished else None)
                                             for i, k in enumerate(deltas)], finished=False)


def _metrics() -> Metrics:
    metrics = Metrics(dict)  # no engine stats: only what the server measures
    metrics.serve("m")
    return metrics


def _values(metrics: Metrics) -> dict[str, float]:
    text = metrics.render().decode()
    return {s.name + ("" if "finished_reason" not in s.labels else ":" + s.labels["finished_reason"]): s.value
            for f in text_string_to_metric_families(text) for s in f.samples
            if s.labels.get("model_name") == "m" and "le" not in s.labels}


@pytest.mark.parametrize("error, reason", [(None, "abort"), (GeneratorExit(), "abort"),
                                           (asyncio.CancelledError(), "abort"), (RequestFailed("x"), "error")])
def test_unfinished_samples_take_the_reason_of_what_cut_them_off(error, reason):
    metrics = _metrics()
    timer = metrics.request(prompt_tokens=2, n=2)
    timer.record(_output(1, 1))
    timer.record(_output(2, 0))  # two tokens of sample 0 at once: two gaps
    timer.record(_output(0, 1, finished={1}))
    timer.end(error)
    v = _values(metrics)
    assert (v["vllm:prompt_tokens_total"], v["vllm:generation_tokens_total"]) == (2, 5)
    assert (v["vllm:time_to_first_token_seconds_count"], v["vllm:inter_token_latency_seconds_count"]) == (1, 3)
    assert v["vllm:e2e_request_latency_seconds_count"] == 1
    assert (v["vllm:request_success_total:stop"], v[f"vllm:request_success_total:{reason}"]) == (1, 1)
    assert timer.finish_reasons == f"{reason},stop"


@pytest.mark.parametrize("error", [InvalidRequest("bad"), EngineOverloaded("full")])
def test_a_refused_request_is_not_a_served_one(error):
    metrics = _metrics()
    metrics.request(prompt_tokens=5, n=1).end(error)
    v = _values(metrics)
    assert v["vllm:e2e_request_latency_seconds_count"] == 0 and v["vllm:prompt_tokens_total"] == 0
    assert [v[f"vllm:request_success_total:{r}"] for r in ("stop", "length", "abort", "error")] == [0, 0, 0, 0]
