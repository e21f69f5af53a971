"""Prometheus metrics, on a registry of the app's own (so several apps can live in one process, as in tests).

Every measurement is exported twice: under our own `jaxserve_*` names and under the `vllm:*` names that vLLM's
Grafana dashboards read, with vLLM's labels (`model_name` = the served model name, `engine` = "0": vLLM numbers
its data-parallel engines, we run one) and vLLM's histogram buckets, so such a dashboard works unchanged.

Counting units: TTFT, end-to-end latency and prompt tokens are per request (one `generate` call, whatever its
`n`); inter-token latency is one observation per gap between two consecutive tokens of the same sample (tokens
that reach the server together share the time since that sample's previous token); `vllm:request_success_total`
counts samples by their finish reason, as vLLM counts the child requests that carry `n > 1`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jaxserve.async_engine import EngineOverloaded
from jaxserve.engine import InvalidRequest
from jaxserve.outputs import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# vLLM's buckets (vllm/v1/metrics/loggers.py), so quantiles computed from them match a vLLM server's.
_VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                      20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_VLLM_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                     40.0, 80.0)
_VLLM_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                     480.0, 960.0, 1920.0, 7680.0)
_VLLM_LABELS = ("model_name", "engine")
_ENGINE_INDEX = "0"
_FINISH_REASONS = ("stop", "length", "abort", "error")


class _Twin:
    """One measurement under our name and under vLLM's, the latter labelled with the served model's name."""

    def __init__(self, ours, theirs):
        self.ours, self.theirs = ours, theirs
        self.labelled = None  # theirs, for the served model (bind())

    def bind(self, model_name: str) -> None:
        self.labelled = self.theirs.labels(model_name, _ENGINE_INDEX)

    def observe(self, value: float) -> None:
        self.ours.observe(value)
        self.labelled.observe(value)

    def inc(self, value: float) -> None:
        self.ours.inc(value)
        self.labelled.inc(value)


class Metrics:
    def __init__(self, engine_stats: Callable[[], dict]):
        """engine_stats: the engine's stats() (empty before it is ready)."""
        self.registry = CollectorRegistry()
        self.model_name: str | None = None  # set by serve(), once the model is loaded
        r = self.registry
        self.requests = Counter("jaxserve_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)

        def histogram(ours: str, theirs: str, doc: str, buckets) -> _Twin:
            return _Twin(Histogram(ours, doc, buckets=_LATENCY_BUCKETS, registry=r),
                         Histogram(theirs, doc, _VLLM_LABELS, buckets=buckets, registry=r))

        def counter(ours: str, theirs: str, doc: str) -> _Twin:
            return _Twin(Counter(ours, doc, registry=r), Counter(theirs, doc, _VLLM_LABELS, registry=r))

        self.ttft = histogram("jaxserve_time_to_first_token_seconds", "vllm:time_to_first_token_seconds",
                              "Time to first token", _VLLM_TTFT_BUCKETS)
        self.itl = histogram("jaxserve_inter_token_latency_seconds", "vllm:inter_token_latency_seconds",
                             "Time between consecutive output tokens of a sample", _VLLM_ITL_BUCKETS)
        self.e2e = histogram("jaxserve_e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds",
                             "Request latency, end to end", _VLLM_E2E_BUCKETS)
        self.prompt_tokens = counter("jaxserve_prompt_tokens", "vllm:prompt_tokens", "Prompt tokens processed")
        self.generation_tokens = counter("jaxserve_generation_tokens", "vllm:generation_tokens", "Tokens generated")
        self.success = Counter("vllm:request_success", "Finished samples by finish reason",
                               [*_VLLM_LABELS, "finished_reason"], registry=r)
        r.register(_EngineCollector(engine_stats, lambda: self.model_name))

    def serve(self, model_name: str) -> None:
        """Labels vLLM's series with the served model's name and creates them at zero, as vLLM does at start-up
        (a dashboard then shows zeros rather than "no data")."""
        self.model_name = model_name
        for twin in (self.ttft, self.itl, self.e2e, self.prompt_tokens, self.generation_tokens):
            twin.bind(model_name)
        for reason in _FINISH_REASONS:
            self.success.labels(model_name, _ENGINE_INDEX, reason)

    def request(self, prompt_tokens: int, n: int) -> RequestTimer:
        return RequestTimer(self, prompt_tokens, n)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """The metrics of one request, measured where the server consumes the engine's outputs."""

    def __init__(self, metrics: Metrics, prompt_tokens: int, n: int):
        self.metrics, self.prompt_tokens, self.n = metrics, prompt_tokens, n
        self.start = time.perf_counter()
        self.ttft: float | None = None
        self.generated = 0
        self.last_token_at: dict[int, float] = {}  # sample index -> when its latest token arrived
        self.finish: dict[int, str] = {}  # sample index -> its finish reason
        self.cut_off = "abort"  # the reason of samples that never finished (see end())

    def record(self, out: RequestOutput) -> None:
        now = time.perf_counter()
        m = self.metrics
        for o in out.outputs:
            new = len(o.token_ids)
            if new:
                if self.ttft is None:
                    self.ttft = now - self.start
                    m.ttft.observe(self.ttft)
                    m.prompt_tokens.inc(self.prompt_tokens)  # counted once the prompt is computed, as vLLM does
                previous = self.last_token_at.get(o.index)
                if previous is None:  # a sample's first token closes no gap; any that came with it, a zero one
                    gap, gaps = 0.0, new - 1
                else:
                    gap, gaps = (now - previous) / new, new
                for _ in range(gaps):
                    m.itl.observe(gap)
                self.last_token_at[o.index] = now
                self.generated += new
                m.generation_tokens.inc(new)
            if o.finish_reason is not None:
                self.finish.setdefault(o.index, o.finish_reason)

    def end(self, error: BaseException | None) -> float:
        """Records the end of the request and returns its latency in seconds.

        error: what ended it early, if anything: a refusal (400 / 429) before any output is not a request the
        engine served and is not counted; a failure makes its unfinished samples "error"; the client leaving
        (the stream is closed or cancelled) makes them "abort".
        """
        total = time.perf_counter() - self.start
        if self.ttft is None and isinstance(error, (InvalidRequest, EngineOverloaded)):
            return total
        m = self.metrics
        m.e2e.observe(total)
        left = error is None or isinstance(error, (GeneratorExit, asyncio.CancelledError))
        self.cut_off = "abort" if left else "error"
        for i in range(self.n):
            m.success.labels(m.model_name, _ENGINE_INDEX, self.finish.get(i, self.cut_off)).inc()
        return total

    @property
    def finish_reasons(self) -> str:
        return ",".join(self.finish.get(i, self.cut_off) for i in range(self.n))


class _EngineCollector:
    """Gauges and engine-side counters, read from the engine's stats at scrape time."""

    _GAUGES = {
        "running": ("jaxserve_num_requests_running", "Sequences in the running batch"),
        "waiting": ("jaxserve_num_requests_waiting", "Sequences waiting for admission"),
        "kv_cache_usage": ("jaxserve_kv_cache_usage_perc", "Fraction of KV-cache pages in use"),
        "prefix_cache_hit_rate": ("jaxserve_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache"),
        "compile_count": ("jaxserve_compile_count", "XLA compilations since start"),
        "generation_tokens_per_s": ("jaxserve_generation_tokens_per_second", "Recent output throughput"),
    }
    _VLLM_GAUGES = {
        "running": ("vllm:num_requests_running", "Number of requests in model execution batches."),
        "waiting": ("vllm:num_requests_waiting", "Number of requests waiting to be processed."),
        "kv_cache_usage": ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
    }
    # Tokens, as vLLM counts them: every lookup queries all tokens of the sequence; hits are those reused.
    # The engine's counters restart with it after a failed step (recover()); Prometheus' rate() handles resets.
    _VLLM_COUNTERS = {
        "prefix_cache_queried_tokens": ("vllm:prefix_cache_queries",
                                        "Prefix cache queries, in terms of number of queried tokens."),
        "prefix_cache_hit_tokens": ("vllm:prefix_cache_hits",
                                    "Prefix cache hits, in terms of number of cached tokens."),
    }
    _COUNTERS = {
        "step_host_seconds": ("jaxserve_step_host_seconds", "Engine step time spent on host work (scheduling, "
                              "inputs, outputs): the device idles meanwhile while steps do not overlap"),
        "step_device_seconds": ("jaxserve_step_device_seconds", "Engine step time spent waiting for the device"),
    }

    def __init__(self, engine_stats: Callable[[], dict], model_name: Callable[[], str]):
        self.engine_stats = engine_stats
        self.model_name = model_name

    def collect(self):
        stats = self.engine_stats()
        if not stats:
            return
        stats = dict(stats, kv_cache_usage=1 - stats["kv_pages_free"] / max(stats["kv_pages_total"], 1))
        for key, (name, doc) in self._GAUGES.items():
            yield GaugeMetricFamily(name, doc, value=float(stats.get(key, 0)))
        for key, (name, doc) in self._COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=float(stats.get(key, 0)))
        labels = [self.model_name(), _ENGINE_INDEX]
        for families, kind in ((self._VLLM_GAUGES, GaugeMetricFamily), (self._VLLM_COUNTERS, CounterMetricFamily)):
            for key, (name, doc) in families.items():
                family = kind(name, doc, labels=_VLLM_LABELS)
                family.add_metric(labels, float(stats[key]))
                yield family
