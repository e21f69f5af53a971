"""Mistral format: content, then `[TOOL_CALLS]` followed by a JSON list of {"name", "arguments"} objects
(v0.3 tokenizers), or by `name[ARGS]{...}` pairs (newer tokenizers)."""

from __future__ import annotations

import json

from jaxserve.text.tool_parsers import ToolCall, call_from_object, calls_from_list, partial_marker

MARKER, ARGS = "[TOOL_CALLS]", "[ARGS]"


def split(text: str, final: bool) -> tuple[str, list[ToolCall], str]:
    start = text.find(MARKER)
    if start == -1:
        keep = 0 if final else partial_marker(text, MARKER)
        return text[: len(text) - keep], [], text[len(text) - keep:]
    calls = _calls(text[start + len(MARKER):])
    if calls is not None:
        return text[:start], calls, ""
    if final:
        return text, [], ""
    return text[:start], [], text[start:]


def _calls(body: str) -> list[ToolCall] | None:
    body = body.strip()
    if body.startswith("["):
        try:
            return calls_from_list(json.loads(body))
        except json.JSONDecodeError:
            return None
    calls = []
    for piece in body.split(MARKER):  # name[ARGS]{...}, possibly repeated with more markers
        name, sep, args = piece.partition(ARGS)
        if not sep or not name.strip():
            return None
        call = call_from_object({"name": name.strip(), "arguments": args.strip()})
        if call is None:
            return None
        calls.append(call)
    return calls or None
