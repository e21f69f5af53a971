"""Result objects of the offline API, shaped as vLLM's RequestOutput / CompletionOutput."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = most likely
    decoded_token: str


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    # Per output token: {token id: Logprob} with the chosen token first, then the top `logprobs` ids.
    logprobs: list[dict[int, Logprob]] | None = None
    # What is new since the previous output of this request (streaming).
    delta_text: str = ""
    delta_token_ids: list[int] = dataclasses.field(default_factory=list)
    delta_logprobs: list[dict[int, Logprob]] | None = None
    error: str | None = None
    error_invalid: bool = False  # the error is the request's own (its constraints allow no token)


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    # With SamplingParams.prompt_logprobs: per prompt token, None for the first (nothing precedes it), then
    # {token id: Logprob} with the prompt's own token first, then the top-k (vLLM's shape).
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


@dataclasses.dataclass
class ChatMessage:
    role: str
    content: str | None
    tool_calls: list | None = None


@dataclasses.dataclass
class ChatOutput:
    """One conversation's answer: the first sample's message, plus the full RequestOutput."""

    message: ChatMessage
    finish_reason: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    request_output: RequestOutput
