"""Running one request on the engine for an HTTP handler: disconnects abort it, outputs become wire objects."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import Request

from jaxserve.async_engine import RequestFailed
from jaxserve.engine import InvalidRequest
from jaxserve.outputs import Logprob, RequestOutput, accumulate
from server.protocol import PromptLogprob, PromptTokensDetails, TokenLogprob, TopLogprob, Usage


async def final_output(outputs: AsyncIterator[RequestOutput], http_request: Request) -> RequestOutput | None:
    """Runs a request (delta outputs) to the end and returns its whole output; None if the client disconnected
    first (the request is then aborted)."""

    async def run():
        total = None
        async for out in outputs:
            total = accumulate(total, out)
        return total

    task = asyncio.create_task(run())
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.2)
        if not done and await http_request.is_disconnected():
            task.cancel()  # cancelling the consumer closes engine.generate, which aborts the request
            try:
                await task
            except asyncio.CancelledError:
                pass
            return None
    return task.result()


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


def token_name(token_id: int, text: str, as_ids: bool) -> str:
    """How a logprob names its token: its text, or "token_id:N" with return_tokens_as_token_ids (for tokens
    that are not text on their own, such as half of a UTF-8 character)."""
    return f"token_id:{token_id}" if as_ids else text


def token_logprobs(entries: list[dict[int, Logprob]], top: int, as_ids: bool = False) -> list[TokenLogprob]:
    """Engine logprob entries (chosen token first) -> OpenAI chat `logprobs.content` items."""
    items = []
    for entry in entries:
        (chosen, lp), *_ = entry.items()
        tops = sorted(entry.items(), key=lambda x: x[1].rank)[:top]
        name = token_name(chosen, lp.decoded_token, as_ids)
        top_names = [(token_name(t, x.decoded_token, as_ids), x) for t, x in tops]
        items.append(TokenLogprob(token=name, logprob=lp.logprob, bytes=_bytes(name), top_logprobs=[
            TopLogprob(token=n, logprob=x.logprob, bytes=_bytes(n)) for n, x in top_names]))
    return items


def prompt_logprobs(entries: list[dict[int, Logprob] | None] | None, as_ids: bool = False) -> list | None:
    """Engine prompt logprobs -> vLLM's wire shape: None first, then {token id: {logprob, rank, decoded_token}}."""
    if entries is None:
        return None
    return [None if e is None else {str(t): PromptLogprob(logprob=x.logprob, rank=x.rank,
                                                          decoded_token=token_name(t, x.decoded_token, as_ids))
                                    for t, x in e.items()} for e in entries]


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def sse(payload) -> str:
    """One Server-Sent Events message; payload is a pydantic model or a plain string such as [DONE]."""
    data = payload if isinstance(payload, str) else payload.model_dump_json()
    return f"data: {data}\n\n"


def sse_failure(e: RequestFailed | InvalidRequest) -> str:
    """A request that failed after its stream began: 400 when its own constraints were at fault, else 500."""
    return sse_error(str(e), 400 if isinstance(e, InvalidRequest) else 500)


def sse_error(message: str, code: int) -> str:
    return sse(json.dumps({"error": {"message": message, "type": "InternalServerError" if code >= 500
                                     else "BadRequestError", "param": None, "code": code}}))
