"""POST /v1/chat/completions: messages -> prompt -> engine -> one chat.completion or a stream of chunks.

Tools reach the chat template; with tool_choice "auto" the answer is parsed for calls by the server's
tool-call parser, with "required" or a named function the answer is constrained to valid calls by a grammar.
A reasoning parser, when configured, splits `<think>` text into `reasoning_content`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import Request

from jaxserve.text import chat_template as templating
from jaxserve.text import reasoning
from jaxserve.text import tool_parsers
from jaxserve.async_engine import RequestFailed
from jaxserve.engine import InvalidRequest
from jaxserve.text.tool_choice import forced_structure
from server.chat_output import ChatPlan, StreamShaper, final_message
from server.generation import final_output, prompt_logprobs, sse, sse_failure, token_logprobs, usage
from server.protocol import (ChatChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChoiceLogprobs,
                             ChunkChoice, Delta, ResponseMessage, random_id)
from server.state import ServerState


def _template_messages(req: ChatCompletionRequest) -> list[dict]:
    """Messages as chat templates expect them (transformers' conventions); content keeps its parts so the
    renderer can give each template the content format it reads."""
    out = []
    for m in req.messages:
        msg = {"role": m.role, "content": [p.model_dump() for p in m.content] if isinstance(m.content, list)
               else m.content}
        if m.name:
            msg["name"] = m.name
        if m.tool_calls:
            msg["tool_calls"] = [tc.model_dump() for tc in m.tool_calls]
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def render_prompt(state: ServerState, req: ChatCompletionRequest, tools: list[dict] | None = None
                  ) -> tuple[str, list[int]]:
    """The rendered chat prompt and its token ids."""
    tokenizer = state.tokenizer
    text = templating.render(tokenizer, _template_messages(req), chat_template=req.chat_template or state.chat_template,
                             add_generation_prompt=req.add_generation_prompt,
                             continue_final_message=req.continue_final_message, tools=tools,
                             documents=req.documents, chat_template_kwargs=req.template_kwargs(),
                             content_format=state.config.chat_template_content_format)
    ids = templating.encode_prompt(tokenizer, text, add_special_tokens=bool(req.add_special_tokens))
    return text, ids[-req.truncate_prompt_tokens:] if req.truncate_prompt_tokens else ids


def _plan(state: ServerState, req: ChatCompletionRequest, tools, tool_choice, reasoning_state) -> ChatPlan:
    forced = tool_choice if tool_choice == "required" or isinstance(tool_choice, dict) else None
    parser = None
    if tools and tool_choice == "auto":
        template = req.chat_template or state.chat_template or state.tokenizer.chat_template
        parser = state.config.tool_call_parser or tool_parsers.parser_for_template(template)
    names = tuple(t["function"]["name"] for t in tools or ()) if parser else ()
    schemas = tool_parsers.schemas_of(tools) if parser else None
    return ChatPlan(tool_parser=parser, forced=forced, reasoning_parser=state.config.reasoning_parser,
                    reasoning_state=reasoning_state, include_reasoning=req.include_reasoning,
                    parallel_tool_calls=req.parallel_tool_calls is not False, tool_names=names,
                    tool_schemas=schemas)


def _prepare(state: ServerState, req: ChatCompletionRequest):
    """The request's text work (template rendering, tokenization, grammar checks; on a worker thread): its plan,
    prompt ids and sampling params. Raises what becomes a 400."""
    state.check_model(req.model)
    tools, tool_choice = req.effective_tools()
    # tool_choice "none" keeps the tools in the prompt (OpenAI's meaning: the model knows them, must not call).
    text, prompt = render_prompt(state, req, tools)
    reasoning_state = reasoning.prompt_state(text) if state.config.reasoning_parser else None
    plan = _plan(state, req, tools, tool_choice, reasoning_state)
    params = req.sampling_params(state.default_max_tokens(len(prompt)), state.sampling_defaults)
    forced = forced_structure(tools or [], tool_choice, req.parallel_tool_calls is not False)
    if forced is not None:
        if params.structured_output is not None:
            raise ValueError("a forced tool_choice cannot be combined with response_format or structured_outputs")
        params.structured_output = forced
    state.check_grammar_size(params.structured_output)
    # Constraints start where the prompt leaves the output: after a think block it opened, after an optional one.
    params.reasoning = reasoning_state
    if req.thinking_token_budget is not None and reasoning_state is None:
        raise ValueError("thinking_token_budget needs a server started with --reasoning-parser")
    params.thinking_token_budget = req.thinking_budget() if reasoning_state is not None else None
    state.check_request(prompt, params, req.priority)  # before a stream starts: errors must be a 400, not an SSE event
    return plan, prompt, params


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest, http_request: Request):
    """Returns a ChatCompletion, an async iterator of SSE strings, or None when the client went away."""
    plan, prompt, params = await asyncio.to_thread(_prepare, state, req)
    request_id = random_id("chatcmpl")
    echo = req.messages[-1].text() if req.echo and req.messages[-1].role == "assistant" else ""
    if req.stream:
        return _stream(state, req, plan, request_id, prompt, params, echo)
    out = await final_output(state.generate(request_id, prompt, params, req.priority), http_request)
    if out is None:
        return None
    choices = []
    as_ids = req.return_tokens_as_token_ids
    for o in out.outputs:
        message, finish = final_message(plan, o.text, o.finish_reason)
        if echo and message["content"] is not None:
            message["content"] = echo + message["content"]
        choices.append(ChatChoice(
            index=o.index, message=ResponseMessage(**message), finish_reason=finish, stop_reason=o.stop_reason,
            logprobs=ChoiceLogprobs(content=token_logprobs(o.logprobs, req.top_logprobs or 0, as_ids))
            if req.logprobs else None, token_ids=list(o.token_ids) if req.return_token_ids else None))
    completion_tokens = sum(len(o.token_ids) for o in out.outputs)
    return ChatCompletion(id=request_id, model=state.model_name, choices=choices,
                          usage=usage(len(prompt), completion_tokens, out.num_cached_tokens),
                          system_fingerprint=state.fingerprint,
                          prompt_logprobs=prompt_logprobs(out.prompt_logprobs, as_ids),
                          prompt_token_ids=prompt if req.return_token_ids else None)


async def _stream(state: ServerState, req: ChatCompletionRequest, plan: ChatPlan, request_id: str, prompt: list[int],
                  params, echo: str) -> AsyncIterator[str]:
    created = int(time.time())
    include_usage, continuous = req.stream_usage()
    completion_tokens = 0
    shapers = [StreamShaper(plan) for _ in range(req.n)]
    finished: set[int] = set()  # choices whose finish chunk is sent

    def chunk(choices, usage_=None, prompt_token_ids=None):
        return sse(ChatCompletionChunk(id=request_id, created=created, model=state.model_name, choices=choices,
                                       usage=usage_, system_fingerprint=state.fingerprint,
                                       prompt_token_ids=prompt_token_ids))

    for i in range(req.n):  # the role comes first, once per choice
        yield chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=echo))],
                    usage(len(prompt), 0, 0) if continuous else None, prompt if req.return_token_ids else None)
    cached = 0
    try:
        async for out in state.generate(request_id, prompt, params, req.priority):
            cached = out.num_cached_tokens
            choices = []
            for o in out.outputs:
                if o.index in finished:  # the engine reports every sample each step; a finished one only once here
                    continue
                completion_tokens += len(o.token_ids)
                shaper = shapers[o.index]
                step = [ChunkChoice(index=o.index, delta=Delta(**d))
                        for d in shaper.feed(o.text, final=o.finish_reason is not None)]
                # The engine releases tokens with their text, so for plain content this step's one delta is exactly
                # the text of its tokens; parsed reasoning or calls carry them (and their logprobs) on their first.
                if (req.logprobs and o.logprobs) or (req.return_token_ids and o.token_ids):
                    step = step or [ChunkChoice(index=o.index, delta=Delta())]
                    if req.logprobs and o.logprobs:
                        step[0].logprobs = ChoiceLogprobs(content=token_logprobs(
                            o.logprobs, req.top_logprobs or 0, req.return_tokens_as_token_ids))
                    if req.return_token_ids:
                        step[0].token_ids = list(o.token_ids)
                choices += step
                if o.finish_reason:
                    finished.add(o.index)
                    finish = "tool_calls" if shaper.made_calls and o.finish_reason == "stop" else o.finish_reason
                    choices.append(ChunkChoice(index=o.index, delta=Delta(), finish_reason=finish,
                                               stop_reason=o.stop_reason))
            for c in choices:  # one entry per chunk, as OpenAI streams
                yield chunk([c], usage(len(prompt), completion_tokens, cached) if continuous else None)
    except (RequestFailed, InvalidRequest) as e:  # headers are sent already: report in the stream, as OpenAI does
        yield sse_failure(e)
        return
    if include_usage:
        yield chunk([], usage(len(prompt), completion_tokens, cached))
    yield sse("[DONE]")
