"""The offline API, shaped as vLLM's: `LLM(model).generate(prompts, params)` and `.chat(messages)`."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from collections.abc import Sequence as Seq

from tqdm.auto import tqdm

from jaxserve.text import chat_template as templating
from jaxserve.text import tool_parsers
from jaxserve.engine import EngineConfig, LLMEngine
from jaxserve.outputs import ChatMessage, ChatOutput, RequestOutput
from jaxserve.sampling_params import RequestOutputKind, SamplingParams

_ENGINE_FIELDS = {f.name for f in EngineConfig.__dataclass_fields__.values()}


class LLM:
    """model: None (the embedded SmolLM2-135M-Instruct), a .gguf file, a transformers folder, or a hub id.
    Engine options (max_model_len, max_num_seqs, page_size, attention_backend, ...) are keyword arguments."""

    def __init__(self, model: str | None = None, *, dtype: str = "auto", progress: bool = True,
                 tool_call_parser: str | None = None, **engine_options):
        unknown = set(engine_options) - _ENGINE_FIELDS
        if unknown:
            raise TypeError(f"unknown LLM options {sorted(unknown)}; engine options are {sorted(_ENGINE_FIELDS)}")
        self.engine = LLMEngine(model, dtype=dtype, config=EngineConfig(**engine_options), progress=progress)
        self.tokenizer = self.engine.tokenizer
        self.tool_call_parser = tool_call_parser  # None: guessed from the chat template when tools are given
        self._ids = itertools.count()

    def generate(self, prompts, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Seq[int] | None = None) -> list[RequestOutput]:
        """prompts: a string, a list of token ids, or a list of either. priority: per prompt, lower first (with
        scheduling_policy="priority")."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or self.get_default_sampling_params()
        params = list(params) if isinstance(params, Seq) else [params] * len(prompts)
        params = [dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY) for p in params]
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        priority = list(priority) if priority is not None else [0] * len(prompts)
        if len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts")
        request_ids = []
        try:
            for prompt, p, rank in zip(prompts, params, priority):
                text, ids = (prompt, self.tokenizer.encode(prompt)) if isinstance(prompt, str) else (None, list(prompt))
                rid = f"offline-{next(self._ids)}"
                self.engine.add_request(rid, ids, p, prompt=text, priority=rank)
                request_ids.append(rid)
            return self._run(request_ids, use_tqdm)
        except BaseException:
            for rid in request_ids:
                self.engine.abort(rid)
            raise

    def get_default_sampling_params(self) -> SamplingParams:
        """What a call without sampling params uses: the model's generation config over SamplingParams' own
        defaults (vLLM's behaviour)."""
        return SamplingParams(**self.engine.model.generation_config)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm) as bar:
            while len(done) < len(request_ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[r] for r in request_ids]

    def chat(self, messages, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             chat_template: str | None = None, chat_template_content_format: str = "auto",
             add_generation_prompt: bool = True, continue_final_message: bool = False, tools: list[dict] | None = None,
             documents: list[dict] | None = None, mm_processor_kwargs: dict | None = None,
             chat_template_kwargs: dict | None = None, use_tqdm: bool = True) -> list[ChatOutput]:
        """messages: one conversation (a list of {"role", "content"} dicts) or a list of conversations."""
        if mm_processor_kwargs:
            raise ValueError("mm_processor_kwargs: multimodal inputs are not supported (text-only models)")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        options = dict(chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                       continue_final_message=continue_final_message, tools=tools, documents=documents,
                       chat_template_kwargs=chat_template_kwargs, content_format=chat_template_content_format)
        prompts = [self._encode_chat(conv, **options) for conv in conversations]
        outputs = self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
        parser = (self.tool_call_parser or tool_parsers.parser_for_template(chat_template or self.tokenizer.chat_template)
                  if tools else None)
        schemas = tool_parsers.schemas_of(tools)
        return [self._chat_output(o, parser, schemas) for o in outputs]

    def _encode_chat(self, conversation: list[dict], **options) -> list[int]:
        return templating.encode_prompt(self.tokenizer, templating.render(self.tokenizer, conversation, **options))

    def stream(self, prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yields the text of one request as it is generated. prompt: text, token ids, or a conversation
        (a list of {"role", "content"} dicts, rendered with the model's chat template)."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            prompt = self._encode_chat(prompt)
        text, ids = (prompt, self.tokenizer.encode(prompt)) if isinstance(prompt, str) else (None, list(prompt))
        rid = f"offline-{next(self._ids)}"
        params = dataclasses.replace(sampling_params or self.get_default_sampling_params(),
                                     output_kind=RequestOutputKind.DELTA)
        self.engine.add_request(rid, ids, params, prompt=text)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        if out.outputs[0].text:
                            yield out.outputs[0].text
                        if out.finished:
                            return
        finally:
            self.engine.abort(rid)  # a consumer that stops early frees the request's pages

    @staticmethod
    def _chat_output(out: RequestOutput, parser: str | None, schemas: dict) -> ChatOutput:
        first = out.outputs[0]
        content, calls, finish = first.text, [], first.finish_reason
        if parser is not None:
            content, calls = tool_parsers.parse(parser, first.text, schemas=schemas)
            finish = "tool_calls" if calls else finish
        message = ChatMessage("assistant", content, [c.to_openai() for c in calls] or None)
        return ChatOutput(message, finish, out.prompt_token_ids, first.token_ids, out)
