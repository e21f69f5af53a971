"""Tool-call parsers: model output text -> content and OpenAI tool calls, complete or streamed.

Each format lives in its own module and implements one function, `split(text, final)`, that cuts the text
seen so far into (content, calls, pending):
- content: plain text that is certainly not part of a tool call;
- calls: the complete, valid tool calls found, as (name, arguments JSON string);
- pending: a trailing piece that may still become a tool call (an unclosed block, or a prefix of its marker).
When `final` is true there is nothing more to come, so a pending piece that never became a valid call is
returned as content: malformed model output falls back to plain text and never raises.

Streaming re-splits the accumulated text at every delta and sends only what is new: content grows by prefix,
and each call is sent once it is complete (first its index, id and name, then its arguments), so the streamed
fragments always concatenate to the final JSON arguments.

Whatever the parser, an answer that is exactly a JSON call of a declared tool, `{"name": ..., "arguments": {...}}`
("parameters" also read), or a list of them, with no markers around it, is taken as those calls: small models
often answer so. A streamed answer that begins with `{` or `[` is therefore held back until it ends.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import uuid

PARSERS = ("hermes", "llama3_json", "mistral", "pythonic")


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as a string
    id: dataclasses.InitVar[str | None] = None

    def __post_init__(self, id):
        self.id = id or f"call_{uuid.uuid4().hex[:24]}"

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def get_parser(name: str):
    if name not in PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of {', '.join(PARSERS)}")
    return importlib.import_module(f"jaxserve.text.tool_parsers.{name}")


def parser_for_template(template: str | None) -> str:
    """Guess the parser from the markers a chat template teaches its model. The default tool prompt that
    jaxserve adds to templates without tool support uses the Hermes format."""
    template = template or ""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or ('"parameters"' in template and "ipython" in template):
        return "llama3_json"
    return "hermes"


def arguments_json(value) -> str | None:
    """Normalizes a call's arguments (an object, or a string holding one) to a JSON string; None if invalid."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if value is None:
        value = {}
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


def call_from_object(obj, arg_keys=("arguments", "parameters")) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = next((obj[k] for k in arg_keys if k in obj), {})
    args = arguments_json(args)
    return ToolCall(obj["name"], args) if args is not None else None


def partial_marker(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (0 if none)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def whole_answer_calls(text: str, names) -> list[ToolCall]:
    """The calls `text` is, when it is exactly a JSON call (or a list of calls) of tools in `names`; else []."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    items = value if isinstance(value, list) and value else [value]
    calls = [call_from_object(item) for item in items]
    return calls if all(c is not None and c.name in names for c in calls) else []


def parse(parser: str, text: str, names=()) -> tuple[str | None, list[ToolCall]]:
    """Complete output -> (content or None, tool calls). names: the declared tools (for whole-answer calls)."""
    content, calls, _ = get_parser(parser).split(text, final=True)
    content = content.strip()
    if not calls and names and (whole := whole_answer_calls(content, names)):
        return None, whole
    return (content or None) if calls else content, calls


class StreamingToolParser:
    """Feeds deltas of one output; returns the content delta and the tool calls completed by each."""

    def __init__(self, parser: str, names=()):
        self.split = get_parser(parser).split
        self.names = names
        self.text = ""
        self.content_sent = 0
        self.calls_sent = 0

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        self.text += delta
        content, calls, _ = self.split(self.text, final)
        if self.names and not calls and self.content_sent == 0 and content.lstrip()[:1] in ("", "{", "["):
            if not final:
                return "", []  # may be a whole-answer call: held until the answer ends
            if whole := whole_answer_calls(content.strip(), self.names):
                self.content_sent = len(content)
                self.calls_sent = len(whole)
                return "", whole
        new_content = content[self.content_sent:]
        self.content_sent = max(self.content_sent, len(content))
        new_calls = calls[self.calls_sent:]
        self.calls_sent = len(calls)
        return new_content, new_calls
