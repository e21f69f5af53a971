"""POST /v1/completions: one or several prompts (text or token ids), n samples each, choices indexed in order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import Request

from jaxserve.async_engine import RequestFailed
from jaxserve.engine import InvalidRequest
from jaxserve.outputs import CompletionOutput
from server.generation import final_output, sse, sse_failure, usage
from server.protocol import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, random_id
from server.state import ServerState


def _logprobs(o: CompletionOutput, entries, offset: int) -> CompletionLogprobs:
    """The legacy completions logprobs format: parallel lists over the output tokens."""
    lp = CompletionLogprobs()
    for entry in entries:
        (_, chosen), *_ = entry.items()
        lp.tokens.append(chosen.decoded_token)
        lp.token_logprobs.append(chosen.logprob)
        lp.top_logprobs.append({t.decoded_token: t.logprob for t in sorted(entry.values(), key=lambda x: x.rank)})
        lp.text_offset.append(offset)
        offset += len(chosen.decoded_token)
    return lp


async def create_completion(state: ServerState, req: CompletionRequest, http_request: Request):
    """Returns a Completion, an async iterator of SSE strings, or None when the client went away."""
    state.check_model(req.model)
    if req.echo and req.logprobs is not None:
        raise ValueError("echo with logprobs needs prompt logprobs, which are not supported")
    tokenizer = state.tokenizer
    prompts = []
    for p in req.prompts():
        ids = tokenizer.encode(p) if isinstance(p, str) else list(p)
        prompts.append(ids[-req.truncate_prompt_tokens:] if req.truncate_prompt_tokens else ids)
    params = [req.sampling_params(state.default_max_tokens(len(ids))) for ids in prompts]
    for ids, p in zip(prompts, params):
        state.check_grammar_size(p.structured_output)
        state.engine.engine.validate(ids, p)  # before a stream starts: errors must be a 400, not an SSE event
    request_id = random_id("cmpl")
    echoes = [tokenizer.decode(ids) if req.echo else "" for ids in prompts]
    if req.stream:
        return _stream(state, req, request_id, prompts, params, echoes)
    tasks = [asyncio.create_task(final_output(state.generate(f"{request_id}-{i}", ids, p), http_request))
             for i, (ids, p) in enumerate(zip(prompts, params))]
    try:
        outs = await asyncio.gather(*tasks)
    finally:  # one prompt failed (or the handler was cancelled): the others are aborted, not left to run
        for t in tasks:
            t.cancel()
    if any(o is None for o in outs):
        return None
    choices = []
    for i, out in enumerate(outs):
        for o in out.outputs:
            choices.append(CompletionChoice(
                index=i * req.n + o.index, text=echoes[i] + o.text, finish_reason=o.finish_reason,
                stop_reason=o.stop_reason, logprobs=_logprobs(o, o.logprobs, 0) if o.logprobs is not None else None))
    completion_tokens = sum(len(o.token_ids) for out in outs for o in out.outputs)
    return Completion(id=request_id, model=state.model_name, choices=choices, system_fingerprint=state.fingerprint,
                      usage=usage(sum(map(len, prompts)), completion_tokens, sum(o.num_cached_tokens for o in outs)))


async def _stream(state: ServerState, req: CompletionRequest, request_id: str, prompts, params, echoes
                  ) -> AsyncIterator[str]:
    created = int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
    queue: asyncio.Queue = asyncio.Queue()
    offsets = {}
    finished: set[int] = set()  # choice indices whose finish chunk is sent

    async def pump(i):
        try:
            async for out in state.generate(f"{request_id}-{i}", prompts[i], params[i]):
                await queue.put((i, out))
        except (RequestFailed, InvalidRequest) as e:
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(prompts))]
    completion_tokens, cached, open_streams = 0, 0, len(prompts)

    def chunk(choices, usage_=None):
        return sse(Completion(id=request_id, created=created, model=state.model_name, choices=choices, usage=usage_,
                              system_fingerprint=state.fingerprint))

    try:
        for i in range(len(prompts)) if req.echo else ():
            for k in range(req.n):
                yield chunk([CompletionChoice(index=i * req.n + k, text=echoes[i], finish_reason=None)])
        while open_streams:
            i, item = await queue.get()
            if item is None:
                open_streams -= 1
                continue
            if isinstance(item, Exception):
                yield sse_failure(item)
                return
            cached += item.num_cached_tokens if item.finished else 0
            for o in item.outputs:
                index = i * req.n + o.index
                if index in finished:  # the engine reports every sample each step; a finished one only once here
                    continue
                completion_tokens += len(o.delta_token_ids)
                if not (o.delta_text or o.delta_logprobs or o.finish_reason):
                    continue
                if o.finish_reason:
                    finished.add(index)
                lp = None
                if o.delta_logprobs is not None:
                    lp = _logprobs(o, o.delta_logprobs, offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + sum(len(t) for t in lp.tokens)
                choice = CompletionChoice(index=index, text=o.delta_text, logprobs=lp, finish_reason=o.finish_reason,
                                          stop_reason=o.stop_reason)
                # One choice per chunk, as OpenAI streams.
                yield chunk([choice], usage(sum(map(len, prompts)), completion_tokens, cached) if continuous else None)
        if include_usage:
            yield chunk([], usage(sum(map(len, prompts)), completion_tokens, cached))
        yield sse("[DONE]")
    finally:
        for t in tasks:
            t.cancel()
