"""Soak: 32 concurrent clients against a real server on 127.0.0.1 for a bounded time, mixing streaming and not,
short and long prompts, cancellations and disconnects mid-stream. Nothing may fail on the server's side, no
request may hang, every KV page must come back, and memory must stay steady.

The default run soaks for 20 s; `JAXSERVE_SOAK_SECONDS=120 pytest -m slow tests/test_soak.py` is the full run.
"""

import asyncio
import os
import random
import re
import time

import httpx
import pytest

import tiny
from serving import Server

CLIENTS = 32
RSS_GROWTH_BOUND_MB = 150  # after warm-up; Python and XLA allocators keep some slack, a leak grows without bound


def _rss_mb(pid: int) -> float:
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def _metric(text: str, name: str) -> float:
    return float(re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M).group(1))


async def _client(url: str, deadline: float, rng: random.Random, tally: dict):
    async with httpx.AsyncClient(timeout=60) as c:
        while time.monotonic() < deadline:
            words = rng.choice([3, 20, 200])
            body = {"messages": [{"role": "user", "content": " ".join(["hello"] * words)}],
                    "max_tokens": rng.choice([1, 8, 64]), "temperature": rng.choice([0, 1.0]),
                    "stream": rng.random() < 0.5}
            cancel = rng.random() < 0.2
            try:
                if body["stream"]:
                    async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
                        tally[r.status_code] = tally.get(r.status_code, 0) + 1
                        async for line in r.aiter_lines():
                            if cancel and line.startswith("data: {"):
                                tally["cancelled"] += 1
                                break  # disconnect mid-stream
                else:
                    coro = c.post(url + "/v1/chat/completions", json=body)
                    if cancel:
                        try:
                            await asyncio.wait_for(coro, timeout=rng.uniform(0.01, 0.2))
                        except asyncio.TimeoutError:
                            tally["cancelled"] += 1
                        continue
                    r = await coro
                    tally[r.status_code] = tally.get(r.status_code, 0) + 1
            except httpx.TimeoutException:
                tally["hung"] += 1


def _soak(tmp_path, seconds: float) -> dict:
    folder = tiny.make_checkpoint(tmp_path / "m", "llama")
    s = Server(str(folder), "--max-model-len", "1024", "--max-num-seqs", "16", "--max-num-batched-tokens", "64",
               "--max-waiting-requests", "64", log_path=tmp_path / "soak.log").wait_ready()
    try:
        tally = {"cancelled": 0, "hung": 0}
        rng = random.Random(0)

        async def run(duration):
            deadline = time.monotonic() + duration
            await asyncio.gather(*[_client(s.url, deadline, random.Random(rng.random()), tally)
                                   for _ in range(CLIENTS)])

        asyncio.run(run(min(5.0, seconds / 4)))  # warm-up: allocators and caches reach their working size
        rss_before = _rss_mb(s.proc.pid)
        asyncio.run(run(seconds))
        time.sleep(1.0)
        metrics = httpx.get(s.url + "/metrics").text
        figures = {
            "seconds": seconds, "clients": CLIENTS, "tally": tally,
            "server_errors": sum(n for k, n in tally.items() if isinstance(k, int) and k >= 500),
            "running_after": _metric(metrics, "jaxserve_num_requests_running"),
            "waiting_after": _metric(metrics, "jaxserve_num_requests_waiting"),
            "kv_usage_after": _metric(metrics, "jaxserve_kv_cache_usage_perc"),
            "rss_growth_mb": _rss_mb(s.proc.pid) - rss_before,
        }
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        assert s.stop() == 0
    print(figures)
    return figures


def _check(f):
    assert f["server_errors"] == 0 and f["tally"]["hung"] == 0
    assert f["tally"].get(200, 0) > 50 and f["tally"]["cancelled"] > 5
    assert set(k for k in f["tally"] if isinstance(k, int)) <= {200, 429}
    assert f["running_after"] == 0 and f["waiting_after"] == 0 and f["kv_usage_after"] == 0  # every page back
    assert f["rss_growth_mb"] < RSS_GROWTH_BOUND_MB


def test_soak_short(tmp_path):
    _check(_soak(tmp_path, 20))


@pytest.mark.slow
def test_soak_full(tmp_path):
    _check(_soak(tmp_path, float(os.environ.get("JAXSERVE_SOAK_SECONDS", "120"))))
