"""POST /v1/chat/completions: messages -> prompt -> engine -> one chat.completion or a stream of chunks."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request

from jaxserve import chat_template as templating
from jaxserve.async_engine import RequestFailed
from server.generation import final_output, sse, sse_error, token_logprobs, usage
from server.protocol import (ChatChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChoiceLogprobs,
                             ChunkChoice, Delta, ResponseMessage, random_id)
from server.state import ServerState, UnsupportedFeature


def _template_messages(req: ChatCompletionRequest) -> list[dict]:
    """Messages as chat templates expect them (transformers' conventions): text content, tool calls as dicts."""
    out = []
    for m in req.messages:
        msg = {"role": m.role, "content": m.text()}
        if m.name:
            msg["name"] = m.name
        if m.tool_calls:
            msg["tool_calls"] = [tc.model_dump() for tc in m.tool_calls]
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def build_prompt(state: ServerState, req: ChatCompletionRequest) -> list[int]:
    tokenizer = state.engine.engine.tokenizer
    text = templating.render(tokenizer, _template_messages(req), chat_template=req.chat_template or state.chat_template,
                             add_generation_prompt=req.add_generation_prompt,
                             continue_final_message=req.continue_final_message, documents=req.documents,
                             chat_template_kwargs=req.chat_template_kwargs)
    ids = templating.encode_prompt(tokenizer, text)
    return ids[-req.truncate_prompt_tokens:] if req.truncate_prompt_tokens else ids


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest, http_request: Request):
    """Returns a ChatCompletion, an async iterator of SSE strings, or None when the client went away."""
    feature = req.unsupported()
    if feature:
        raise UnsupportedFeature(f"{feature} is not supported yet")
    state.check_model(req.model)
    prompt = build_prompt(state, req)
    params = req.sampling_params(state.default_max_tokens(len(prompt)))
    state.engine.engine.validate(prompt, params)  # before a stream starts: errors must be a 400, not an SSE event
    request_id = random_id("chatcmpl")
    echo = req.messages[-1].text() if req.echo and req.messages[-1].role == "assistant" else ""
    if req.stream:
        return _stream(state, req, request_id, prompt, params, echo)
    out = await final_output(state.generate(request_id, prompt, params), http_request)
    if out is None:
        return None
    choices = [ChatChoice(index=o.index, message=ResponseMessage(content=echo + o.text), finish_reason=o.finish_reason,
                          stop_reason=o.stop_reason,
                          logprobs=ChoiceLogprobs(content=token_logprobs(o.logprobs, req.top_logprobs or 0))
                          if req.logprobs else None)
               for o in out.outputs]
    completion_tokens = sum(len(o.token_ids) for o in out.outputs)
    return ChatCompletion(id=request_id, model=state.model_name, choices=choices,
                          usage=usage(len(prompt), completion_tokens, out.num_cached_tokens),
                          system_fingerprint=state.fingerprint)


async def _stream(state: ServerState, req: ChatCompletionRequest, request_id: str, prompt: list[int], params,
                  echo: str) -> AsyncIterator[str]:
    created = int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
    completion_tokens = 0

    def chunk(choices, usage_=None):
        return sse(ChatCompletionChunk(id=request_id, created=created, model=state.model_name, choices=choices,
                                       usage=usage_, system_fingerprint=state.fingerprint))

    for i in range(req.n):  # the role comes first, once per choice
        yield chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=echo))])
    cached = 0
    try:
        async for out in state.generate(request_id, prompt, params):
            cached = out.num_cached_tokens
            choices = []
            for o in out.outputs:
                completion_tokens += len(o.delta_token_ids)
                logprobs = (ChoiceLogprobs(content=token_logprobs(o.delta_logprobs, req.top_logprobs or 0))
                            if req.logprobs and o.delta_logprobs else None)
                if not (o.delta_text or logprobs or o.finish_reason):
                    continue  # text held back (it may begin a stop string): nothing to send yet
                choices.append(ChunkChoice(index=o.index, delta=Delta(content=o.delta_text or None),
                                           logprobs=logprobs, finish_reason=o.finish_reason, stop_reason=o.stop_reason))
            if choices:
                yield chunk(choices, usage(len(prompt), completion_tokens, cached) if continuous else None)
    except RequestFailed as e:  # headers are sent already: report in the stream, as OpenAI does
        yield sse_error(str(e), 500)
        return
    if include_usage:
        yield chunk([], usage(len(prompt), completion_tokens, cached))
    yield sse("[DONE]")
