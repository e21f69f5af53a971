"""What the running server knows: its configuration, the engine once it is ready, metrics."""

from __future__ import annotations

import copy
import dataclasses
import logging
import pathlib
import threading
from collections.abc import AsyncIterator

from jaxserve.async_engine import AsyncEngine
from jaxserve.parallel.distributed import Cluster
from jaxserve.engine import EngineConfig
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import RequestOutputKind, SamplingParams
from server.metrics import Metrics

log = logging.getLogger("jaxserve")


class UnknownModel(LookupError):
    """The request names a model this server does not serve (404)."""


@dataclasses.dataclass
class ServerConfig:
    model: str | None = None
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    chat_template: str | None = None  # a file path or the template itself
    chat_template_content_format: str = "auto"
    tool_call_parser: str | None = None  # None: guessed from the chat template
    reasoning_parser: str | None = None
    dtype: str = "auto"
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    max_waiting_requests: int = 256
    max_request_bytes: int = 4 * 2**20  # larger bodies get 413 before they are read
    max_grammar_bytes: int = 64 * 2**10  # larger schemas, regexes and grammars get 400 before compiling
    allowed_origins: tuple[str, ...] = ()  # CORS stays off unless origins are given
    cluster: Cluster | None = None  # several processes: this one is the leader (process 0)
    drain_timeout: float = 30.0
    generation_config: str = "auto"  # "auto": the model's sampling defaults apply; "vllm": the API's own


def read_chat_template(value: str | None) -> str | None:
    """--chat-template takes a file or the template text itself, as vLLM's does."""
    if value is None:
        return None
    path = pathlib.Path(value).expanduser()
    try:
        if path.is_file():
            return path.read_text()
    except OSError:  # a long inline template can be an invalid file name
        pass
    return value


class ServerState:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.chat_template = read_chat_template(config.chat_template)
        self.engine: AsyncEngine | None = None
        self.model_name = config.served_model_name or "loading"
        self.fingerprint = "fp_jaxserve"
        self.draining = False
        self.failed = False  # the engine could not start (the log says why)
        self.metrics = Metrics(lambda: self.engine.stats() if self.engine else {})
        self._tokenizer = None  # the server's own copy of the engine's tokenizer, taken before any request
        self._per_thread = threading.local()
        self._copy_lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.draining

    def attach(self, engine: AsyncEngine, loaded_name: str) -> None:
        self.model_name = self.config.served_model_name or loaded_name
        self.metrics.serve(self.model_name)
        self._tokenizer = copy.deepcopy(engine.engine.tokenizer)
        self.engine = engine

    @property
    def tokenizer(self):
        """A tokenizer for the calling thread alone. The engine thread decodes with the engine's; fast
        tokenizers are not safe to share across threads (transformers 5 raises "Already borrowed"), so each
        server thread encodes with its own copy."""
        tokenizer = getattr(self._per_thread, "tokenizer", None)
        if tokenizer is None:
            with self._copy_lock:  # copies are taken from the server's copy, never from one in use
                tokenizer = self._per_thread.tokenizer = copy.deepcopy(self._tokenizer)
        return tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    @property
    def sampling_defaults(self) -> dict:
        return self.engine.engine.model.generation_config if self.config.generation_config == "auto" else {}

    def check_model(self, name: str | None) -> None:
        if name and name != self.model_name:
            raise UnknownModel(f"The model `{name}` does not exist. This server serves `{self.model_name}`.")

    def check_grammar_size(self, spec) -> None:
        """Bounds the text a grammar is compiled from, so compile time stays bounded too."""
        if spec is None:
            return
        size = sum(len(x.encode()) for x in (spec.json, spec.regex, spec.grammar, *(spec.choice or ())) if x)
        if size > self.config.max_grammar_bytes:
            raise ValueError(f"the output constraint is {size} bytes; this server accepts at most "
                             f"{self.config.max_grammar_bytes} (--max-grammar-bytes)")

    def check_request(self, prompt: list[int], params: SamplingParams, priority: int) -> None:
        """Raises ValueError / InvalidRequest for what the engine would refuse, before any response starts."""
        if priority != 0 and self.config.engine.scheduling_policy != "priority":
            raise ValueError(f"priority {priority} was given, but this server schedules first come, first served "
                             "(start it with --scheduling-policy priority)")
        self.engine.engine.validate(prompt, params)

    def default_max_tokens(self, prompt_len: int) -> int:
        """Without max_tokens a chat answer may use the rest of the context (as vLLM does)."""
        if prompt_len >= self.max_model_len:
            raise ValueError(f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                             f"prompt has {prompt_len} tokens. Please reduce the length of the messages.")
        return self.max_model_len - prompt_len

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams, priority: int = 0
                       ) -> AsyncIterator[RequestOutput]:
        """engine.generate with metrics and the one log line per request. Outputs are deltas (RequestOutputKind.DELTA):
        each carries the tokens and text that are new since the one before."""
        params = dataclasses.replace(params, output_kind=RequestOutputKind.DELTA)
        timer = self.metrics.request(len(prompt), params.n)
        error = None
        try:
            async for out in self.engine.generate(request_id, prompt, params, priority):
                timer.record(out)
                yield out
        except BaseException as e:  # refused, failed or cut off: the metrics count each differently
            error = e
            raise
        finally:
            total = timer.end(error)
            log.info("request %s: prompt %d tokens, completion %d tokens, ttft %s, total %.3f s, finish %s",
                     request_id, len(prompt), timer.generated, "-" if timer.ttft is None else f"{timer.ttft:.3f} s",
                     total, timer.finish_reasons)
