"""The OpenAI-compatible wire format: every request and response body the server speaks, in one place.

Requests accept every field of OpenAI's Chat Completions / Completions APIs plus vLLM's sampling extras, and
ignore unknown fields (the OpenAI SDK merges `extra_body` into the body). Value ranges follow OpenAI's
documentation; `to_sampling_params` is the one mapping from a request to the engine's SamplingParams.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from jaxserve.sampling_params import MAX_LOGPROBS, SamplingParams
from jaxserve.text.structured_output import StructuredOutput


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --- messages ------------------------------------------------------------------------------------------------


class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


# --- tools -----------------------------------------------------------------------------------------------------


class FunctionDefinition(_Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: FunctionName


# --- structured output -----------------------------------------------------------------------------------------


class JsonSchemaFormat(_Request):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")  # "schema" would shadow a pydantic method
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format json_schema needs json_schema.schema, a JSON schema object")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs; an unknown option is an error rather than silently unconstrained output."""

    model_config = ConfigDict(extra="forbid")
    json_: str | dict[str, Any] | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(_Request):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: str | Annotated[list[str], Field(max_length=64)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    seed: Annotated[int, Field(ge=-2**63, lt=2**63)] | None = None  # int64, as OpenAI and vLLM accept
    user: str | None = None
    # vLLM extras
    top_k: Annotated[int, Field(ge=-1, lt=2**31)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=2)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: Annotated[int, Field(ge=1)] | None = None
    request_id: str | None = None
    echo: bool = False
    # None: none; k: per prompt token after the first, its logprob and the k most likely (-1 is refused).
    prompt_logprobs: Annotated[int, Field(ge=-1, le=MAX_LOGPROBS)] | None = None
    return_tokens_as_token_ids: bool = False  # logprob tokens written "token_id:N" (for tokens that are not text)
    return_token_ids: bool = False  # the prompt's and each choice's token ids in the response
    cache_salt: Annotated[str, Field(min_length=1)] | None = None  # only requests with the same salt share cache
    priority: int = 0  # with --scheduling-policy priority: lower runs first
    # Defaults of the request's own kind (chat: False, the template adds BOS; completions: True).
    add_special_tokens: bool | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def structured(self) -> StructuredOutput | None:
        """The output constraint from response_format, structured_outputs or the guided_* extras."""
        found = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(StructuredOutput(json_object=True))
        elif rf is not None and rf.type == "json_schema":
            found.append(StructuredOutput.from_schema(rf.json_schema.schema_, strict=bool(rf.json_schema.strict)))
        so = self.structured_outputs.model_dump(by_alias=True) if self.structured_outputs else {}
        legacy = {"json": self.guided_json, "regex": self.guided_regex, "choice": self.guided_choice,
                  "grammar": self.guided_grammar}
        so.update({k: v for k, v in legacy.items() if v is not None})
        for key, value in so.items():
            if value is None or value is False:
                continue
            if key == "json":
                schema = json.loads(value) if isinstance(value, str) else value
                if not isinstance(schema, dict):
                    raise ValueError("a guided / structured_outputs json schema must be a JSON object")
                found.append(StructuredOutput.from_schema(schema))
            elif key == "json_object":
                found.append(StructuredOutput(json_object=True))
            elif key == "regex":
                found.append(StructuredOutput(regex=value))
            elif key == "choice":
                found.append(StructuredOutput(choice=tuple(value)))
            else:
                found.append(StructuredOutput(grammar=value))
        if len(found) > 1:
            raise ValueError("give one output constraint: response_format, structured_outputs or one guided_* field")
        return found[0] if found else None

    @model_validator(mode="after")
    def _check_stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs is not available when streaming")
        return self

    def stream_usage(self) -> tuple[bool, bool]:
        """(a final usage chunk, usage on every chunk): continuous stats only with include_usage, as vLLM."""
        include = bool(self.stream_options and self.stream_options.include_usage)
        return include, include and self.stream_options.continuous_usage_stats

    def to_sampling_params(self, max_tokens: int | None, default_max_tokens: int, logprobs: int | None,
                           defaults: dict | None = None) -> SamplingParams:
        """defaults: the model's generation config (temperature, top_p, top_k, min_p, repetition_penalty), used
        where the request leaves a field out."""
        defaults = defaults or {}

        def pick(name, fallback):
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, fallback)

        seed = None if self.seed is None else self.seed % 2**63  # OpenAI seeds may be negative
        return SamplingParams(
            n=self.n, temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0), top_k=pick("top_k", 0),
            min_p=pick("min_p", 0.0), presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=pick("repetition_penalty", 1.0),
            logit_bias=self.logit_bias, allowed_token_ids=self.allowed_token_ids, min_tokens=self.min_tokens,
            logprobs=logprobs, seed=seed, max_tokens=max_tokens or default_max_tokens, stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output, skip_special_tokens=self.skip_special_tokens,
            structured_output=self.structured(), prompt_logprobs=self.prompt_logprobs, cache_salt=self.cache_salt,
            bad_words=self.bad_words,
        )


# reasoning_effort -> thinking_token_budget ("none" switches thinking off in the template instead).
EFFORT_BUDGETS = {"minimal": 64, "low": 256, "medium": 1024, "high": 4096, "xhigh": 16384}


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = None
    function_call: Literal["none", "auto"] | FunctionName | None = None
    # vLLM extras
    include_reasoning: bool = True
    thinking_token_budget: Annotated[int, Field(ge=0)] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("continue_final_message cannot be used with add_generation_prompt (set it to false)")
        return self

    def effective_tools(self) -> tuple[list[dict] | None, str | dict | None]:
        """(tools, tool_choice) as the plain dicts templates and the engine take, with the deprecated
        functions / function_call mapped onto them."""
        tools, choice = self.tools, self.tool_choice
        if self.functions and not tools:
            tools = [Tool(function=f) for f in self.functions]
            fc = self.function_call
            choice = NamedToolChoice(function=fc) if isinstance(fc, FunctionName) else fc
        tools = [t.model_dump(exclude_none=True) for t in tools] if tools else None
        if isinstance(choice, BaseModel):
            choice = choice.model_dump()
        if tools and choice is None:
            choice = "auto"
        return tools, choice or "none"

    def template_kwargs(self) -> dict[str, Any] | None:
        """chat_template_kwargs, with reasoning_effort as the templates' thinking switch (the request's own
        kwargs win): "none" renders enable_thinking false, any other effort true; it is passed on as well."""
        if self.reasoning_effort is None:
            return self.chat_template_kwargs
        return {"enable_thinking": self.reasoning_effort != "none", "reasoning_effort": self.reasoning_effort,
                **(self.chat_template_kwargs or {})}

    def thinking_budget(self) -> int | None:
        """Tokens allowed inside the think block: thinking_token_budget, else reasoning_effort's budget."""
        if self.thinking_token_budget is not None:
            return self.thinking_token_budget
        return EFFORT_BUDGETS.get(self.reasoning_effort)

    def sampling_params(self, default_max_tokens: int, defaults: dict | None = None) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.to_sampling_params(self.max_completion_tokens or self.max_tokens, default_max_tokens, logprobs,
                                       defaults)


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.best_of not in (None, self.n):
            raise ValueError("best_of other than n is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def sampling_params(self, default_max_tokens: int, defaults: dict | None = None) -> SamplingParams:
        # echo with logprobs reports the prompt's tokens too, so it needs their logprobs (vLLM's behaviour).
        params = self.to_sampling_params(self.max_tokens, default_max_tokens, self.logprobs, defaults)
        if self.echo and self.logprobs is not None and params.prompt_logprobs is None:
            params.prompt_logprobs = self.logprobs
        return params


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True
    return_token_strs: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# --- responses -------------------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning: str | None = None  # vLLM's current name; reasoning_content is the older one, still read by clients
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


_EXTRAS = ("prompt_logprobs", "prompt_token_ids", "token_ids")


class _WithExtras(BaseModel):
    """vLLM's optional response fields appear only when the request asked for them (absent, not null)."""

    @model_serializer(mode="wrap")
    def _omit_extras(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None or k not in _EXTRAS}


class PromptLogprob(BaseModel):
    logprob: float
    rank: int
    decoded_token: str


# vLLM's prompt_logprobs: per prompt token, None for the first, else {token id: its Logprob} (own token first).
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class ChatChoice(_WithExtras):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # return_token_ids


class ChatCompletion(_WithExtras):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None  # return_token_ids


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = None  # the same text as reasoning_content, under vLLM's current name
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # {index, id?, type?, function: {name?, arguments}}

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler):
        # OpenAI's deltas carry only what changed: {"content": "..."}, or {} in the finishing chunk.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(_WithExtras):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # return_token_ids: the tokens of this chunk


class ChatCompletionChunk(_WithExtras):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    prompt_token_ids: list[int] | None = None  # return_token_ids: in each choice's first chunk


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_WithExtras):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None  # return_token_ids
    token_ids: list[int] | None = None  # return_token_ids (streaming: this chunk's)


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "jaxserve"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
