"""From generated text to an assistant message: reasoning, content and tool calls, whole or as stream deltas.

The plan is fixed per request: which reasoning parser splits off `<think>` text, and whether tool calls are
parsed from free text (tool_choice "auto", with the server's tool-call parser) or read from an output that a
grammar forced into shape (tool_choice "required" or a named function).
"""

from __future__ import annotations

import dataclasses
import json
import re

from jaxserve.text import reasoning, tool_parsers
from jaxserve.text.tool_choice import forced_calls, named_tool
from jaxserve.text.tool_parsers import ToolCall


@dataclasses.dataclass(frozen=True)
class ChatPlan:
    tool_parser: str | None = None  # parse free text for calls ("auto")
    forced: str | dict | None = None  # "required" or a named tool_choice: the output is constrained JSON
    reasoning_parser: str | None = None
    reasoning_state: str | None = None  # where the prompt leaves the output (reasoning.prompt_state)
    include_reasoning: bool = True
    parallel_tool_calls: bool = True  # False: at most one call is returned
    tool_names: tuple[str, ...] = ()  # the declared tools: an answer that is exactly a call of one is that call
    tool_schemas: dict | None = None  # their parameter schemas by name, for formats that write values as text


def final_message(plan: ChatPlan, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
    """Returns (message fields: content, reasoning, reasoning_content, tool_calls), finish_reason."""
    reasoning_text, content = None, text
    if plan.reasoning_parser:
        reasoning_text, content = reasoning.parse(plan.reasoning_parser, text, plan.reasoning_state)
        content = content or ""
    calls: list[ToolCall] = []
    if plan.forced is not None:
        calls = forced_calls(content, plan.forced) or cut_off_calls(content, plan.forced)
        content = None  # the grammar made the output calls, never prose, even when it was cut off early
    elif plan.tool_parser:
        content, calls = tool_parsers.parse(plan.tool_parser, content, plan.tool_names, plan.tool_schemas)
    if not plan.parallel_tool_calls:
        calls = calls[:1]
    if calls and finish_reason == "stop":
        finish_reason = "tool_calls"
    shown = reasoning_text if plan.include_reasoning else None
    message = {"content": content, "tool_calls": [c.to_openai() for c in calls], "reasoning": shown,
               "reasoning_content": shown}
    return message, finish_reason


class StreamShaper:
    """Turns text deltas of one choice into OpenAI delta dicts (content, reasoning_content, tool_calls)."""

    def __init__(self, plan: ChatPlan):
        self.plan = plan
        self.reasoner = (reasoning.StreamingReasoningParser(plan.reasoning_parser, plan.reasoning_state)
                         if plan.reasoning_parser else None)
        self.tools = (tool_parsers.StreamingToolParser(plan.tool_parser, plan.tool_names, plan.tool_schemas)
                      if plan.tool_parser and not plan.forced else None)
        self.forced_text = ""
        self.forced_name_sent = False
        self.num_calls = 0

    def feed(self, delta: str, final: bool) -> list[dict]:
        deltas = []
        content = delta
        if self.reasoner is not None:
            thought, content = self.reasoner.feed(delta, final)
            if thought and self.plan.include_reasoning:
                deltas.append({"reasoning": thought, "reasoning_content": thought})
        if self.plan.forced is not None:
            return deltas + self._forced(content, final)
        if self.tools is not None:
            content, calls = self.tools.feed(content, final)
            if content:
                deltas.append({"content": content})
            if not self.plan.parallel_tool_calls:
                calls = calls[: max(0, 1 - self.num_calls)]
            for call in calls:
                deltas += self._call_deltas(call)
            return deltas
        return deltas + ([{"content": content}] if content else [])

    @property
    def made_calls(self) -> bool:
        return self.num_calls > 0

    def _call_deltas(self, call: ToolCall, arguments: str | None = None) -> list[dict]:
        """A call's header (index, id, name), then its arguments, as OpenAI streams them."""
        index = self.num_calls
        self.num_calls += 1
        head = {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        args = call.arguments if arguments is None else arguments
        return [{"tool_calls": [head]}] + ([{"tool_calls": [{"index": index, "function": {"arguments": args}}]}]
                                          if args else [])

    def _forced(self, content: str, final: bool) -> list[dict]:
        name = named_tool(self.plan.forced)
        if name is not None:
            # The grammar guarantees these characters are the arguments object: stream them as they come.
            deltas = []
            if not self.forced_name_sent:
                self.forced_name_sent = True
                deltas = self._call_deltas(ToolCall(name, "{}"), arguments="")
            if content:
                deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": content}}]})
            return deltas
        self.forced_text += content
        if not final:
            return []
        deltas = []
        for call in forced_calls(self.forced_text, self.plan.forced) or cut_off_calls(self.forced_text,
                                                                                      self.plan.forced):
            deltas += self._call_deltas(call)
        return deltas


# One item of a "required" call list as the grammar writes it (json.dumps style), possibly cut off inside.
_ITEM_HEAD = re.compile(r'\{"name": ("(?:[^"\\]|\\.)*"), "parameters": ')


def cut_off_calls(text: str, tool_choice) -> list[ToolCall]:
    """The calls of a forced output that stopped early (max_tokens), with the arguments produced so far, as vLLM
    reports them; the grammar guarantees the text is a prefix of valid calls."""
    name = named_tool(tool_choice)
    if name is not None:
        return [ToolCall(name, text)] if text else []
    calls, at, decoder = [], 1, json.JSONDecoder()
    while at < len(text):
        at += len(text[at:]) - len(text[at:].lstrip(", "))
        try:
            item, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            head = _ITEM_HEAD.match(text, at)
            if head:
                calls.append(ToolCall(json.loads(head.group(1)), text[head.end():]))
            break
        calls.append(ToolCall(item["name"], json.dumps(item["parameters"], ensure_ascii=False)))
        at = end
    return calls

