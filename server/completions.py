"""POST /v1/completions: one or several prompts (text or token ids), n samples each, choices indexed in order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import Request

from jaxserve.async_engine import RequestFailed
from jaxserve.engine import InvalidRequest
from server.generation import final_output, prompt_logprobs, sse, sse_failure, token_name, usage
from server.protocol import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, random_id
from server.state import ServerState


def _logprobs(entries, offset: int, as_ids: bool, first: tuple[int, str] | None = None
              ) -> tuple[CompletionLogprobs, int]:
    """The legacy completions logprobs format: parallel lists over the tokens, and the offset after them.
    Offsets count characters of the choice's text from `offset`. first: (token id, text) of the prompt's first
    token, which nothing predicts (its entry is None)."""
    lp = CompletionLogprobs()
    for entry in entries:
        lp.text_offset.append(offset)
        if entry is None:
            token, text = first
            lp.tokens.append(token_name(token, text, as_ids))
            lp.token_logprobs.append(None)
            lp.top_logprobs.append(None)
            offset += len(text)
            continue
        (chosen, top), *_ = entry.items()
        lp.tokens.append(token_name(chosen, top.decoded_token, as_ids))
        lp.token_logprobs.append(top.logprob)
        lp.top_logprobs.append({token_name(t, x.decoded_token, as_ids): x.logprob
                                for t, x in sorted(entry.items(), key=lambda e: e[1].rank)})
        offset += len(top.decoded_token)
    return lp, offset


def _echo_logprobs(out, tokenizer, as_ids: bool) -> CompletionLogprobs:
    """echo with logprobs: the prompt's tokens come first, the first without a logprob (vLLM's behaviour)."""
    first = out.prompt_token_ids[0]
    return _logprobs(out.prompt_logprobs, 0, as_ids, first=(first, tokenizer.decode([first])))[0]


def encode_prompts(tokenizer, req: CompletionRequest) -> list[list[int]]:
    """Each prompt's token ids (text is encoded with special tokens unless add_special_tokens is false)."""
    prompts = []
    for p in req.prompts():
        ids = tokenizer.encode(p, add_special_tokens=req.add_special_tokens is not False) if isinstance(p, str) \
            else list(p)
        prompts.append(ids[-req.truncate_prompt_tokens:] if req.truncate_prompt_tokens else ids)
    return prompts


def _prepare(state: ServerState, req: CompletionRequest):
    """The request's text work (tokenization, grammar checks, echoed text; on a worker thread): each prompt's ids,
    sampling params and echo. Raises what becomes a 400."""
    state.check_model(req.model)
    tokenizer = state.tokenizer
    prompts = encode_prompts(tokenizer, req)
    params = [req.sampling_params(state.default_max_tokens(len(ids)), state.sampling_defaults) for ids in prompts]
    for ids, p in zip(prompts, params):
        state.check_grammar_size(p.structured_output)
        state.check_request(ids, p, req.priority)  # before a stream starts: errors must be a 400, not an SSE event
    return prompts, params, [tokenizer.decode(ids) if req.echo else "" for ids in prompts]


async def create_completion(state: ServerState, req: CompletionRequest, http_request: Request):
    """Returns a Completion, an async iterator of SSE strings, or None when the client went away."""
    prompts, params, echoes = await asyncio.to_thread(_prepare, state, req)
    request_id = random_id("cmpl")
    if req.stream:
        return _stream(state, req, request_id, prompts, params, echoes)
    tasks = [asyncio.create_task(final_output(state.generate(f"{request_id}-{i}", ids, p, req.priority), http_request))
             for i, (ids, p) in enumerate(zip(prompts, params))]
    try:
        outs = await asyncio.gather(*tasks)
    finally:  # one prompt failed (or the handler was cancelled): the others are aborted, not left to run
        for t in tasks:
            t.cancel()
    if any(o is None for o in outs):
        return None
    choices = []
    as_ids = req.return_tokens_as_token_ids
    for i, out in enumerate(outs):
        for o in out.outputs:
            lp = None
            if o.logprobs is not None:
                lp, _ = _logprobs(o.logprobs, len(echoes[i]), as_ids)
                if req.echo:
                    lp = _join(_echo_logprobs(out, state.tokenizer, as_ids), lp)
            choices.append(CompletionChoice(
                index=i * req.n + o.index, text=echoes[i] + o.text, finish_reason=o.finish_reason,
                stop_reason=o.stop_reason, logprobs=lp,
                prompt_logprobs=prompt_logprobs(out.prompt_logprobs, as_ids) if req.prompt_logprobs is not None
                else None, **_token_ids(req, prompts[i], o.token_ids)))
    completion_tokens = sum(len(o.token_ids) for out in outs for o in out.outputs)
    return Completion(id=request_id, model=state.model_name, choices=choices, system_fingerprint=state.fingerprint,
                      usage=usage(sum(map(len, prompts)), completion_tokens, sum(o.num_cached_tokens for o in outs)))


def _join(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=a.top_logprobs + b.top_logprobs, text_offset=a.text_offset + b.text_offset)


def _token_ids(req: CompletionRequest, prompt: list[int] | None, token_ids) -> dict:
    """return_token_ids: the choice's prompt (None: already sent in this stream) and its (new) token ids."""
    if not req.return_token_ids:
        return {}
    return {"prompt_token_ids": prompt, "token_ids": list(token_ids)}


async def _stream(state: ServerState, req: CompletionRequest, request_id: str, prompts, params, echoes
                  ) -> AsyncIterator[str]:
    created = int(time.time())
    include_usage, continuous = req.stream_usage()
    queue: asyncio.Queue = asyncio.Queue()
    offsets = {}
    finished: set[int] = set()  # choice indices whose finish chunk is sent
    # echo with logprobs: the prompt's chunk waits for its logprobs, which come with the request's first output.
    echo_later = req.echo and req.logprobs is not None
    as_ids = req.return_tokens_as_token_ids

    async def pump(i):
        try:
            async for out in state.generate(f"{request_id}-{i}", prompts[i], params[i], req.priority):
                await queue.put((i, out))
        except (RequestFailed, InvalidRequest) as e:
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(prompts))]
    completion_tokens, cached, open_streams = 0, 0, len(prompts)
    started: set[int] = set()  # choices whose first chunk (echo, prompt token ids) is sent

    def chunk(choices, usage_=None):
        return sse(Completion(id=request_id, created=created, model=state.model_name, choices=choices, usage=usage_,
                              system_fingerprint=state.fingerprint))

    def first_chunk(i, k, out=None):
        index = i * req.n + k
        started.add(index)
        lp = _echo_logprobs(out, state.tokenizer, as_ids) if out is not None else None
        offsets[index] = len(echoes[i])
        return chunk([CompletionChoice(index=index, text=echoes[i], finish_reason=None, logprobs=lp,
                                       **_token_ids(req, prompts[i], []))],
                     usage(sum(map(len, prompts)), completion_tokens, cached) if continuous else None)

    try:
        for i in range(len(prompts)) if (req.echo or req.return_token_ids) and not echo_later else ():
            for k in range(req.n):
                yield first_chunk(i, k)
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
                if echo_later and index not in started:
                    yield first_chunk(i, o.index, item)
                completion_tokens += len(o.token_ids)
                if not (o.text or o.logprobs or o.finish_reason):
                    continue
                if o.finish_reason:
                    finished.add(index)
                lp = None
                if o.logprobs is not None:
                    lp, offsets[index] = _logprobs(o.logprobs, offsets.get(index, 0), as_ids)
                choice = CompletionChoice(index=index, text=o.text, logprobs=lp, finish_reason=o.finish_reason,
                                          stop_reason=o.stop_reason, **_token_ids(req, None, o.token_ids))
                # One choice per chunk, as OpenAI streams.
                yield chunk([choice], usage(sum(map(len, prompts)), completion_tokens, cached) if continuous else None)
        if include_usage:
            yield chunk([], usage(sum(map(len, prompts)), completion_tokens, cached))
        yield sse("[DONE]")
    finally:
        for t in tasks:
            t.cancel()
