"""Pythonic format (Llama 3.2 / 4 style): the whole answer is a Python list of calls with keyword arguments,
`[get_weather(city="Paris"), get_time(zone="CET")]`, read with `ast` (literals only, nothing is evaluated)."""

from __future__ import annotations

import ast
import json

from jaxserve.text.tool_parsers import ToolCall


def split(text: str, final: bool) -> tuple[str, list[ToolCall], str]:
    body = text.strip()
    if not body.startswith("["):
        return text, [], ""
    calls = _calls(body)
    if calls is not None:
        return "", calls, ""
    return (text, [], "") if final else ("", [], text)


def _calls(body: str) -> list[ToolCall] | None:
    try:
        tree = ast.parse(body, mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for node in tree.elts:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args):
            return None
        try:
            args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
            calls.append(ToolCall(node.func.id, json.dumps(args, ensure_ascii=False)))
        except (ValueError, TypeError, SyntaxError):
            return None
    return calls
