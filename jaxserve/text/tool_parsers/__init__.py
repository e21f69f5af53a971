"""Tool-call parsers: model output text -> content and OpenAI tool calls, complete or streamed.

Each format lives in its own module and implements one function, `split(text, final)`, that cuts the text
seen so far into (content, calls, pending) (a format whose values are bare text, `TYPED_BY_SCHEMA`, also takes
`schemas`, the declared tools' parameter schemas by name, to give each value its JSON type):
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
import functools
import importlib
import json
import uuid

PARSERS = ("hermes", "llama3_json", "mistral", "phi4_mini_json", "pythonic", "qwen3_coder", "qwen3_xml")
ALIASES = {"qwen3_coder": "qwen3_xml"}  # vLLM's two names for Qwen3-Coder's XML format


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as a string
    id: dataclasses.InitVar[str | None] = None

    def __post_init__(self, id):
        self.id = id or f"call_{uuid.uuid4().hex[:24]}"

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def schemas_of(tools) -> dict:
    """The request's tools' parameter schemas by function name (what TYPED_BY_SCHEMA formats read)."""
    return {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools or ()}


def get_parser(name: str):
    if name not in PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of {', '.join(PARSERS)}")
    return importlib.import_module(f"jaxserve.text.tool_parsers.{ALIASES.get(name, name)}")


def _splitter(parser: str, schemas: dict | None):
    module = get_parser(parser)
    if getattr(module, "TYPED_BY_SCHEMA", False):
        return functools.partial(module.split, schemas=schemas or {})
    return module.split


def parser_for_template(template: str | None) -> str:
    """Guess the parser from the markers a chat template teaches its model. The default tool prompt that
    jaxserve adds to templates without tool support uses the Hermes format."""
    template = template or ""
    if "<parameter=" in template:  # Qwen3-Coder teaches `<tool_call>` blocks too, but with XML inside
        return "qwen3_xml"
    if "<|tool|>" in template and "message['tools']" in template:  # Phi-4-mini: tools on the system message
        return "phi4_mini_json"
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


def calls_from_list(value) -> list[ToolCall] | None:
    """The calls of a non-empty JSON list of call objects; None if it is anything else."""
    calls = [call_from_object(item) for item in value] if isinstance(value, list) and value else [None]
    return None if None in calls else calls


def call_from_object(obj, arg_keys=("arguments", "parameters")) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = next((obj[k] for k in arg_keys if k in obj), {})
    args = arguments_json(args)
    return ToolCall(obj["name"], args) if args is not None else None


def split_blocks(text: str, final: bool, open_: str, close: str, read) -> tuple[str, list[ToolCall], str]:
    """`split` for formats whose calls are `open_ BODY close` blocks, any number, with text around them; read(BODY)
    gives the call or None. A block ends at the first `close` after which its body reads as a call, since a value
    may hold the close marker as text; a block that never reads is plain text once the output is final."""
    content, calls, pos = [], [], 0
    while True:
        start = text.find(open_, pos)
        if start == -1:
            rest = text[pos:]
            keep = 0 if final else partial_marker(rest, open_)
            content.append(rest[: len(rest) - keep])
            return "".join(content), calls, rest[len(rest) - keep:]
        body, end = start + len(open_), text.find(close, start + len(open_))
        while end != -1 and (call := read(text[body:end])) is None:
            end = text.find(close, end + 1)
        if end != -1:
            content.append(text[pos:start])
            calls.append(call)
            pos = end + len(close)
            continue
        if not final:  # a later close may still complete it
            content.append(text[pos:start])
            return "".join(content), calls, text[start:]
        end = text.find(close, body)  # never a call: a model that stopped mid-call, or a malformed block, is text
        if end == -1:
            content.append(text[pos:])
            return "".join(content), calls, ""
        content.append(text[pos:end + len(close)])
        pos = end + len(close)


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
    calls = calls_from_list(value if isinstance(value, list) else [value])
    return calls if calls and all(c.name in names for c in calls) else []


def parse(parser: str, text: str, names=(), schemas: dict | None = None) -> tuple[str | None, list[ToolCall]]:
    """Complete output -> (content or None, tool calls). names: the declared tools (for whole-answer calls);
    schemas: their parameter schemas by name (for formats that write values as text)."""
    content, calls, _ = _splitter(parser, schemas)(text, final=True)
    content = content.strip()
    if not calls and names and (whole := whole_answer_calls(content, names)):
        return None, whole
    return (content or None) if calls else content, calls


class StreamingToolParser:
    """Feeds deltas of one output; returns the content delta and the tool calls completed by each."""

    def __init__(self, parser: str, names=(), schemas: dict | None = None):
        self.split = _splitter(parser, schemas)
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
