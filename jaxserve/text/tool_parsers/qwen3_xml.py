"""Qwen3-Coder XML format (vLLM's `qwen3_xml`, also named `qwen3_coder`), any number of calls with text before:

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

Values are bare text (one newline after the opening tag and one before the closing tag belong to the markup), so
each is given the JSON type its parameter declares: integer, number, boolean, object, array and null values are read
as JSON (or as Python literals, which is how Qwen3-Coder's template writes earlier calls' non-string values), and
kept as text when they do not read as the declared type; string and undeclared parameters stay text."""

from __future__ import annotations

import ast
import json
import re

from jaxserve.text.tool_parsers import ToolCall, split_blocks

TYPED_BY_SCHEMA = True
OPEN, CLOSE = "<tool_call>", "</tool_call>"
FUNCTION = re.compile(r"\s*<function=([^\s<>{}\"']+)>")
PARAMETER = re.compile(r"\s*<parameter=([^<>\n]+)>")
FUNCTION_END, PARAMETER_END = "</function>", "</parameter>"
_PY_TYPES = {"integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": (list, tuple),
             "null": type(None)}


def split(text: str, final: bool, schemas: dict) -> tuple[str, list[ToolCall], str]:
    return split_blocks(text, final, OPEN, CLOSE, lambda body: _call(body, schemas))


def _call(body: str, schemas: dict) -> ToolCall | None:
    head = FUNCTION.match(body)
    if head is None:
        return None
    schema = schemas.get(head.group(1)) or {}
    args = _parameters(body, head.end(), schema.get("properties") or {})
    return None if args is None else ToolCall(head.group(1), json.dumps(args, ensure_ascii=False))


def _parameters(body: str, pos: int, properties: dict) -> dict | None:
    """The parameters from `pos` to the closing `</function>`, or None if the body is not that. A value may hold
    `</parameter>` as text (code often does), so each one is tried in turn until the rest of the body reads."""
    if body[pos:].strip() == FUNCTION_END:
        return {}
    param = PARAMETER.match(body, pos)
    if param is None:
        return None
    name, start = param.group(1), param.end()
    end = body.find(PARAMETER_END, start)
    while end != -1:
        rest = _parameters(body, end + len(PARAMETER_END), properties)
        if rest is not None:
            value = body[start:end]
            value = value[1:] if value.startswith("\n") else value
            value = value[:-1] if value.endswith("\n") else value
            return {name: _typed(value, properties.get(name)), **rest}
        end = body.find(PARAMETER_END, end + 1)
    return None


def _typed(value: str, schema) -> object:
    """`value` as the JSON type `schema` declares ("type", a list of types, or anyOf options); text if none fits."""
    schema = schema if isinstance(schema, dict) else {}
    kinds = schema.get("type", [option.get("type") for option in schema.get("anyOf", []) if isinstance(option, dict)])
    kinds = [kinds] if isinstance(kinds, str) else [k for k in kinds if isinstance(k, str)]
    wanted = tuple(k for k in kinds if k in _PY_TYPES)
    if not wanted or ("string" in kinds and not (value == "null" and "null" in wanted)):
        return value
    for read in (json.loads, ast.literal_eval):  # literals only: nothing is evaluated
        try:
            parsed = read(value.strip())
            json.dumps(parsed, allow_nan=False)  # 1e400 reads as infinity, which JSON cannot carry
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue
        if any(isinstance(parsed, _PY_TYPES[k]) and isinstance(parsed, bool) == (k == "boolean") for k in wanted):
            return parsed
    return value
