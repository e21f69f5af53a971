"""Hermes / Qwen2.5 format: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number, with text around."""

from __future__ import annotations

import json

from jaxserve.text.tool_parsers import ToolCall, call_from_object, partial_marker

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def split(text: str, final: bool) -> tuple[str, list[ToolCall], str]:
    content, calls, pos = [], [], 0
    while True:
        start = text.find(OPEN, pos)
        if start == -1:
            rest = text[pos:]
            keep = 0 if final else partial_marker(rest, OPEN)
            content.append(rest[: len(rest) - keep])
            return "".join(content), calls, rest[len(rest) - keep:]
        end = text.find(CLOSE, start + len(OPEN))
        if end == -1:
            if final:  # never closed: a model that stopped mid-call (or a truncated output) is plain text
                content.append(text[pos:])
                return "".join(content), calls, ""
            content.append(text[pos:start])
            return "".join(content), calls, text[start:]
        call = _call(text[start + len(OPEN):end])
        if call is None:  # not a valid call: keep the block as text
            content.append(text[pos:end + len(CLOSE)])
        else:
            content.append(text[pos:start])
            calls.append(call)
        pos = end + len(CLOSE)


def _call(body: str) -> ToolCall | None:
    try:
        return call_from_object(json.loads(body))
    except json.JSONDecodeError:
        return None
