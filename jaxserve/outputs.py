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
    """One sample's output. text, token_ids and logprobs hold what was generated so far, or with
    RequestOutputKind.DELTA what is new since the request's previous output (a token goes out with its text)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    # Per output token: {token id: Logprob} with the chosen token first, then the top `logprobs` ids.
    logprobs: list[dict[int, Logprob]] | None = None
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


def accumulate(total: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Folds a DELTA output into the request's running total (None at first); the total's lists grow in place,
    so a request costs time in proportion to its tokens, not their square."""
    if total is None:
        total = dataclasses.replace(delta, outputs=[])
    done = {o.index: o for o in total.outputs}
    for o in delta.outputs:
        t = done.get(o.index)
        if t is None:
            t = CompletionOutput(o.index, "", [], None, logprobs=None if o.logprobs is None else [])
            total.outputs.append(t)
        t.text += o.text
        t.token_ids += o.token_ids
        if o.logprobs is not None:
            t.logprobs += o.logprobs
        t.finish_reason, t.stop_reason, t.error, t.error_invalid = (o.finish_reason, o.stop_reason, o.error,
                                                                    o.error_invalid)
    total.outputs.sort(key=lambda o: o.index)
    total.finished, total.num_cached_tokens = delta.finished, delta.num_cached_tokens
    total.prompt_logprobs = delta.prompt_logprobs
    return total
