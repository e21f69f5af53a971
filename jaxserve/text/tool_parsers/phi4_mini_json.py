"""Phi-4-mini format (vLLM's `phi4_mini_json`): `functools[{"name": ..., "arguments": {...}}, ...]`, a JSON list of
calls after the word `functools`; text before and after it is content."""

from __future__ import annotations

import json

from jaxserve.text.tool_parsers import ToolCall, calls_from_list, partial_marker

MARKER = "functools["  # the bracket included: the bare word also appears in Python prose (`import functools`)


def split(text: str, final: bool) -> tuple[str, list[ToolCall], str]:
    start = text.find(MARKER)
    if start == -1:
        keep = 0 if final else partial_marker(text, MARKER)
        return text[: len(text) - keep], [], text[len(text) - keep:]
    try:
        value, end = json.JSONDecoder().raw_decode(text, start + len(MARKER) - 1)
        calls = calls_from_list(value)
    except json.JSONDecodeError:
        calls = None
    if calls is not None:
        return text[:start] + text[end:], calls, ""
    if final:
        return text, [], ""
    return text[:start], [], text[start:]
