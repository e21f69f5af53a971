"""Schemathesis against the server's own OpenAPI document, in process (ASGI): no 5xx, no hang, and every
documented JSON response matches its schema. A small sample runs by default; `pytest -m slow` runs 2,000+."""

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

import tiny
from jaxserve.async_engine import AsyncEngine
from jaxserve.engine import EngineConfig, LLMEngine
from server.app import build_app
from server.state import ServerConfig, ServerState

CHECKS = [not_a_server_error, response_schema_conformance]


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    folder = tiny.make_checkpoint(tmp_path_factory.mktemp("fuzz"), "llama")
    # A 128-token context bounds every generated request (n <= 128 samples of at most 128 tokens), so each one
    # finishes in seconds and "no hung request" is a meaningful check.
    engine = LLMEngine(str(folder), config=EngineConfig(max_model_len=128, max_num_seqs=16, max_num_batched_tokens=64,
                                                        compile_cache_dir=""), progress=False)
    config = ServerConfig(model=str(folder), served_model_name="tiny", max_waiting_requests=64)
    state = ServerState(config)
    state.attach(AsyncEngine(engine, config.max_waiting_requests), "tiny")
    yield schemathesis.openapi.from_asgi("/openapi.json", build_app(config, state))
    state.engine.shutdown()


# The bound on any one request: the worst case the 128-token context allows (n=128 samples of 128 tokens, 16 at a
# time) takes a few seconds, so a request still unanswered after this long is hung.
HANG_SECONDS = 60


def _fuzz(api_schema, examples_per_route: int, derandomize: bool) -> tuple[int, float]:
    """Drives every operation with hypothesis-generated requests; returns how many were sent and the slowest (s).
    derandomize: the same requests on every run (the default suite), else new ones each run (the full run)."""
    sent, slowest = 0, 0.0
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=examples_per_route, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None, derandomize=derandomize)
        @given(case=operation.as_strategy())
        def run(case):
            nonlocal sent, slowest
            start = time.perf_counter()
            # The transport cancels the request and raises ReadTimeout past the bound: a hang fails the test.
            response = case.call(timeout=HANG_SECONDS)
            slowest = max(slowest, time.perf_counter() - start)
            case.validate_response(response, checks=CHECKS)
            sent += 1

        run()
    return sent, slowest


# Routes without parameters (GET /health, ...) yield one example each; the four POST routes carry the count.
def test_fuzz_sample(api_schema):
    sent, slowest = _fuzz(api_schema, examples_per_route=30, derandomize=True)
    print(f"fuzzed {sent} requests, slowest {slowest:.1f} s")
    assert sent >= 100


@pytest.mark.slow
def test_fuzz_full(api_schema):
    sent, slowest = _fuzz(api_schema, examples_per_route=550, derandomize=False)
    print(f"fuzzed {sent} requests, slowest {slowest:.1f} s")
    assert sent >= 2000
