"""Llama 3.1/3.2 JSON format: the answer is `{"name": ..., "parameters": {...}}` (optionally after
`<|python_tag|>`), several calls separated by `;`. Calls are read one complete object at a time; what follows
the last complete call (a cut-off or malformed object) is plain content once the output is final."""

from __future__ import annotations

import json

from jaxserve.text.tool_parsers import ToolCall, call_from_object

TAG = "<|python_tag|>"


def split(text: str, final: bool) -> tuple[str, list[ToolCall], str]:
    stripped = text.lstrip()
    if not final and stripped and TAG.startswith(stripped):
        return "", [], text  # may be the tag, arriving in pieces
    body = stripped[len(TAG):] if stripped.startswith(TAG) else stripped
    if not body.lstrip().startswith("{"):
        return (text, [], "") if body.strip() or final else ("", [], text)
    calls, rest = _calls(body)
    if not calls:
        return (text, [], "") if final else ("", [], text)
    return (rest, calls, "") if final else ("", calls, rest)


def _calls(body: str) -> tuple[list[ToolCall], str]:
    """The complete calls at the start of `body`, and the text after them."""
    decoder = json.JSONDecoder()
    calls, pos = [], 0
    while True:
        while pos < len(body) and body[pos] in " \t\n;":
            pos += 1
        try:
            obj, end = decoder.raw_decode(body, pos)
        except json.JSONDecodeError:
            return calls, body[pos:]
        call = call_from_object(obj)
        if call is None:
            return calls, body[pos:]
        calls.append(call)
        pos = end
