"""The synchronous engine: requests in, one scheduled step at a time, RequestOutputs out.

The engine core (engine_core.py) works on token ids; the output processor (output_processor.py) makes text of
them. Here they run on one thread, the processor's work for step N overlapping the device's work on step N+1.
`LLM` drives this to completion; the async server engine runs the core and the processor on threads of their
own.
"""

from __future__ import annotations

from jaxserve.text import bad_words
from jaxserve.parallel.distributed import Cluster
from jaxserve.core.engine_core import EngineConfig, EngineCore, InvalidRequest
from jaxserve.weights.loader import LoadedModel
from jaxserve.text.output_processor import OutputProcessor
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams

__all__ = ["EngineConfig", "InvalidRequest", "LLMEngine"]


class LLMEngine:
    def __init__(self, model: str | LoadedModel | None = None, *, dtype: str = "auto",
                 config: EngineConfig = EngineConfig(), progress: bool = True, cluster: Cluster | None = None):
        """cluster: this process's place among several (already initialized); followers only mirror device calls
        (see `follow`), the leader schedules."""
        self.core = EngineCore(model, dtype=dtype, config=config, progress=progress, cluster=cluster)
        self.tokenizer = self.core.tokenizer
        self.output = OutputProcessor(self.tokenizer, self.core.token_text)

    # What callers read of the core.
    @property
    def model(self):
        return self.core.model

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def block_manager(self):
        return self.core.block_manager

    @property
    def runner(self):
        return self.core.runner

    @property
    def grammars(self):
        return self.core.grammars

    @property
    def requests(self):
        return self.core.requests

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, priority: int = 0) -> None:
        bad = bad_words.token_sequences(self.tokenizer, params.bad_words) if params.bad_words else None
        self.core.add_request(request_id, prompt_token_ids, params, priority, bad)
        self.output.add_request(request_id, prompt, prompt_token_ids, params)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.core.validate(prompt_token_ids, params)

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)
        self.output.forget(request_id)

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Runs one core step; returns an output for every request that got new tokens (as its output_kind asks)."""
        outputs, finishes = self.output.process(self.core.step())
        for finish in finishes:
            self.core.finish(*finish)
        return outputs

    def token_text(self, token_id: int) -> str:
        return self.core.token_text(token_id)

    def recover(self) -> None:
        for request_id in list(self.core.requests):
            self.output.forget(request_id)
        self.core.recover()

    def follow(self) -> None:
        self.core.follow()

    def close(self) -> None:
        self.core.close()

    def stats(self) -> dict:
        return self.core.stats() | {"output_seconds": self.output.seconds}
