"""Prometheus metrics, on a registry of the app's own (so several apps can live in one process, as in tests)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, engine_stats: Callable[[], dict]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("jaxserve_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("jaxserve_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("jaxserve_inter_token_latency_seconds", "Time between output tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("jaxserve_e2e_request_latency_seconds", "Request latency, end to end",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("jaxserve_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("jaxserve_generation_tokens", "Tokens generated", registry=r)
        r.register(_EngineCollector(engine_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Gauges read from the engine's stats at scrape time."""

    _GAUGES = {
        "running": ("jaxserve_num_requests_running", "Sequences in the running batch"),
        "waiting": ("jaxserve_num_requests_waiting", "Sequences waiting for admission"),
        "kv_cache_usage": ("jaxserve_kv_cache_usage_perc", "Fraction of KV-cache pages in use"),
        "prefix_cache_hit_rate": ("jaxserve_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache"),
        "compile_count": ("jaxserve_compile_count", "XLA compilations since start"),
        "generation_tokens_per_s": ("jaxserve_generation_tokens_per_second", "Recent output throughput"),
    }

    def __init__(self, engine_stats: Callable[[], dict]):
        self.engine_stats = engine_stats

    def collect(self):
        stats = self.engine_stats()
        if not stats:
            return
        stats = dict(stats, kv_cache_usage=1 - stats["kv_pages_free"] / max(stats["kv_pages_total"], 1))
        for key, (name, doc) in self._GAUGES.items():
            yield GaugeMetricFamily(name, doc, value=float(stats.get(key, 0)))
