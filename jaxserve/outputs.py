"""Result objects of the offline API, shaped as vLLM's RequestOutput / CompletionOutput."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0


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
