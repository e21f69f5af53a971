"""Hermes / Qwen2.5 format: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number, with text around."""

from __future__ import annotations

import json

from jaxserve.text.tool_parsers import ToolCall, call_from_object, split_blocks

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def split(text: str, final: bool) -> tuple[str, list[ToolCall], str]:
    return split_blocks(text, final, OPEN, CLOSE, _call)


def _call(body: str) -> ToolCall | None:
    try:
        return call_from_object(json.loads(body))
    except json.JSONDecodeError:
        return None
