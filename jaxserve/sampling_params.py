"""SamplingParams, shaped as vLLM's. Every field here is implemented; values are checked on creation."""

from __future__ import annotations

import dataclasses
import enum

from jaxserve.text import reasoning
from jaxserve.text.structured_output import StructuredOutput

MAX_LOGPROBS = 20


class RequestOutputKind(enum.Enum):
    """What each RequestOutput of a request carries (vLLM's names)."""

    CUMULATIVE = 0  # everything generated so far
    DELTA = 1  # only what is new since the request's previous output
    FINAL_ONLY = 2  # one output, when the request finishes, with everything


@dataclasses.dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    banned_token_ids: list[int] | None = None
    bad_words: list[str] | None = None  # words never to produce (as token sequences, see bad_words.py)
    min_tokens: int = 0
    logprobs: int | None = None  # None: none; k: the chosen token's logprob plus the k most likely (k <= 20)
    # None: none; k: per prompt token (after the first), its logprob plus the k most likely; -1 (vLLM's "whole
    # vocabulary") is refused by the engine, which knows the vocabulary size, as vLLM refuses it past 20.
    prompt_logprobs: int | None = None
    structured_output: StructuredOutput | None = None  # constrained decoding (JSON schema, regex, choice, grammar)
    # For reasoning models, where the prompt leaves the output (jaxserve.text.reasoning: "opened" inside a think block,
    # "closed" after one, "absent" before an optional one); None: no reasoning. Constraints start after the block.
    reasoning: str | None = None
    # At most this many tokens inside the think block, then "</think>" is forced (needs reasoning opened/absent).
    thinking_token_budget: int | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None = up to the context limit
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    cache_salt: str | None = None  # prefix-cache isolation: only requests with the same salt share cached pages

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        try:  # JSON object keys arrive as strings
            self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()} or None
        except (TypeError, ValueError):
            raise ValueError("logit_bias keys must be token ids and values numbers") from None
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            (self.n >= 1, "n must be at least 1"),
            (self.temperature >= 0, "temperature must be non-negative"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.top_k < 2**31, "top_k must be -1 (disabled), 0 (disabled) or a positive 32-bit integer"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be at least 1"),
            (self.seed is None or 0 <= self.seed < 2**63, "seed must be a non-negative 64-bit integer"),
            (self.reasoning in (None, *reasoning.STATES), f"reasoning must be one of {', '.join(reasoning.STATES)}"),
            (self.thinking_token_budget is None or self.thinking_token_budget >= 0,
             "thinking_token_budget must be non-negative"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (0 < self.repetition_penalty <= 2, "repetition_penalty must be in (0, 2]"),
            (self.min_tokens >= 0, "min_tokens must be non-negative"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens must not exceed max_tokens"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, f"logprobs must be in [0, {MAX_LOGPROBS}]"),
            (self.prompt_logprobs is None or self.prompt_logprobs >= -1, "prompt_logprobs must be a positive value or -1"),
            (self.prompt_logprobs is None or self.prompt_logprobs <= MAX_LOGPROBS,
             f"Requested prompt logprobs of {self.prompt_logprobs}, which is greater than max allowed: {MAX_LOGPROBS}"),
            (all(-100 <= b <= 100 for b in (self.logit_bias or {}).values()), "logit_bias values must be in [-100, 100]"),
            (self.allowed_token_ids is None or len(self.allowed_token_ids) > 0, "allowed_token_ids must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def token_ids_used(self) -> list[int]:
        """Every token id the request names, for the engine to check against the vocabulary."""
        return [*map(int, self.logit_bias or {}), *(self.allowed_token_ids or []), *(self.banned_token_ids or []),
                *self.stop_token_ids]

    @property
    def needs_bias_row(self) -> bool:
        return bool(self.logit_bias or self.allowed_token_ids is not None or self.banned_token_ids)
