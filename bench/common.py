"""Shared pieces of the benchmarks: request sets, senders (in-process engine or HTTP), the load loop, statistics.

A sender is `send(prompt_ids, params) -> async iterator of new-token counts`; the load loop times each arrival,
so the same measurement runs against the engine in this process or against any OpenAI-compatible server.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import time

import httpx
import numpy as np

PERSON_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"]}


@dataclasses.dataclass
class Request:
    prompt: list[int] | str  # token ids, or text for servers that take only text
    max_tokens: int
    constrained: bool = False


@dataclasses.dataclass
class Result:
    ttft: float
    itls: list[float]
    latency: float
    output_tokens: int
    prompt_tokens: int


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model for the in-process engine (default: embedded SmolLM2)")
    p.add_argument("--url", help="benchmark a running OpenAI-compatible server instead (e.g. http://127.0.0.1:8000/v1)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default="auto", help="weights, as `jaxserve serve --quantization`")
    p.add_argument("--kv-cache-dtype", default="auto", help="as `jaxserve serve --kv-cache-dtype`")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--json", action="store_true", help="also print one JSON line with every number")
    p.add_argument("--verbose", action="store_true")


def make_requests(n: int, prompt_len, output_len, vocab: int, seed: int, constrained: int = 0) -> list[Request]:
    """prompt_len / output_len: an int (fixed) or a (low, high) range drawn uniformly with a fixed seed."""
    rng = np.random.default_rng(seed)

    def draw(spec):
        return int(spec) if isinstance(spec, int) else int(rng.integers(spec[0], spec[1] + 1))

    reqs = []
    for i in range(n):
        p, o = draw(prompt_len), draw(output_len)
        reqs.append(Request(rng.integers(100, vocab - 100, p).tolist(), o, constrained=i < constrained))
    return reqs


class EngineSender:
    """Runs the engine in this process (start-up and warm-up included in `start_s`)."""

    def __init__(self, args):
        from jaxserve.async_engine import AsyncEngine
        from jaxserve.engine import EngineConfig, LLMEngine

        start = time.perf_counter()
        cfg = EngineConfig(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                           max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed,
                           quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
        self.llm_engine = LLMEngine(args.model, dtype=args.dtype, config=cfg, progress=args.verbose)
        self.engine = AsyncEngine(self.llm_engine, max_waiting_requests=100_000)
        self.start_s = time.perf_counter() - start
        self.vocab = self.llm_engine.model.cfg.vocab_size
        self.temperature = args.temperature
        self._ids = itertools.count()

    def compile_count(self) -> int:
        return self.engine.stats()["compile_count"]

    async def send(self, req: Request):
        from jaxserve.sampling_params import RequestOutputKind, SamplingParams
        from jaxserve.text.structured_output import StructuredOutput

        params = SamplingParams(max_tokens=req.max_tokens, temperature=self.temperature, ignore_eos=not req.constrained,
                                structured_output=StructuredOutput.from_schema(PERSON_SCHEMA) if req.constrained
                                else None, output_kind=RequestOutputKind.DELTA)
        async for out in self.engine.generate(f"bench-{next(self._ids)}", req.prompt, params):
            yield len(out.outputs[0].token_ids)

    def close(self):
        self.engine.shutdown()


class HttpSender:
    """Streams /v1/completions with token-id prompts from a running server."""

    def __init__(self, args, ban_token: int | None = None):
        """ban_token: an EOS id to forbid through logit_bias, for servers that have no ignore_eos."""
        self.ban_token = ban_token
        self.url = args.url.rstrip("/")
        self.temperature = args.temperature
        models = httpx.get(self.url + "/models").json()["data"]
        self.model = models[0]["id"]
        self.vocab = 32000  # prompts are random ids below any common vocabulary size
        self.start_s = float("nan")

    def compile_count(self) -> int:
        text = httpx.get(self.url.rsplit("/v1", 1)[0] + "/metrics").text
        line = next((x for x in text.splitlines() if x.startswith("jaxserve_compile_count ")), None)
        return int(float(line.split()[1])) if line else -1

    async def send(self, req: Request):
        body = {"model": self.model, "prompt": req.prompt, "max_tokens": req.max_tokens, "stream": True,
                "temperature": self.temperature, "stream_options": {"include_usage": True,
                                                                    "continuous_usage_stats": True}}
        if self.ban_token is not None:
            body["logit_bias"] = {str(self.ban_token): -100}
        else:
            body["ignore_eos"] = not req.constrained
        if req.constrained:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON_SCHEMA}}
        seen = 0
        # A client per request: each benchmark phase runs in its own event loop (a connection costs ~0.1 ms here).
        async with httpx.AsyncClient(timeout=None) as client, client.stream("POST", self.url + "/completions",
                                                                            json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage")
                if usage:  # exact counts where the server reports them per chunk (continuous_usage_stats)
                    yield usage["completion_tokens"] - seen
                    seen = usage["completion_tokens"]
                elif chunk.get("choices") and chunk["choices"][0].get("text"):
                    seen += 1  # otherwise one token per text chunk, corrected by a final usage if one comes
                    yield 1

    def close(self):
        pass


def make_sender(args):
    return HttpSender(args) if args.url else EngineSender(args)


async def _timed(send, req: Request) -> Result:
    start = time.perf_counter()
    last, first, itls, tokens = start, None, [], 0
    async for n in send(req):
        now = time.perf_counter()
        if n:
            if first is None:
                first = now - start
            else:
                itls.extend([(now - last) / n] * n)
            last = now
            tokens += n
    return Result(first or float("nan"), itls, time.perf_counter() - start, tokens, len(req.prompt))


async def run_load(send, requests: list[Request], concurrency: int | None = None, rate: float | None = None,
                   seed: int = 0) -> tuple[list[Result], float]:
    """Sends every request, at most `concurrency` at once, or as a Poisson process of `rate` requests/s."""
    start = time.perf_counter()
    if rate:
        gaps = np.random.default_rng(seed).exponential(1 / rate, len(requests))

        async def delayed(delay, req):
            await asyncio.sleep(delay)
            return await _timed(send, req)

        results = await asyncio.gather(*[delayed(d, r) for d, r in zip(np.cumsum(gaps), requests)])
    else:
        sem = asyncio.Semaphore(concurrency or len(requests))

        async def bounded(req):
            async with sem:
                return await _timed(send, req)

        results = await asyncio.gather(*[bounded(r) for r in requests])
    return list(results), time.perf_counter() - start


def summarize(results: list[Result], duration: float) -> dict:
    ttft = np.array([r.ttft for r in results])
    itl = np.array([x for r in results for x in r.itls]) if any(r.itls for r in results) else np.array([np.nan])
    out_tokens = sum(r.output_tokens for r in results)
    return {
        "requests": len(results), "duration_s": duration, "output_tokens": out_tokens,
        "output_tok_s": out_tokens / duration,
        "total_tok_s": (out_tokens + sum(r.prompt_tokens for r in results)) / duration,
        "ttft_p50_ms": 1e3 * np.nanpercentile(ttft, 50), "ttft_p99_ms": 1e3 * np.nanpercentile(ttft, 99),
        "itl_p50_ms": 1e3 * np.nanpercentile(itl, 50), "itl_p99_ms": 1e3 * np.nanpercentile(itl, 99),
        "latency_p50_s": float(np.percentile([r.latency for r in results], 50)),
    }


def print_report(title: str, numbers: dict, as_json: bool) -> None:
    print(f"== {title}")
    for key, value in numbers.items():
        print(f"{key:>24}: {value:.2f}" if isinstance(value, float) else f"{key:>24}: {value}")
    if as_json:
        print(json.dumps({"benchmark": title, **numbers}))
