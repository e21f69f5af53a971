"""Forced tool calls: tool_choice "required" or a named function constrain the output with a JSON schema,
so the arguments always parse and validate against the tool's parameters, whatever the model. The schemas
are strict (no invented keys), as OpenAI's strict function calling.

A named function's output is its arguments object itself. "required" produces a JSON list of
{"name", "parameters"} items, one branch per tool (at most one item when parallel_tool_calls is false).
"""

from __future__ import annotations

import json

from jaxserve.structured_output import StructuredOutput
from jaxserve.tool_parsers import ToolCall


def _parameters(tool: dict) -> dict:
    params = tool.get("function", tool).get("parameters") or {}
    return params or {"type": "object", "properties": {}}


def tool_names(tools: list[dict]) -> list[str]:
    return [t.get("function", t)["name"] for t in tools]


def named_tool(tool_choice) -> str | None:
    """The function name of a named tool_choice ({"type": "function", "function": {"name": ...}}), else None."""
    if isinstance(tool_choice, dict):
        return (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
    return None


def forced_structure(tools: list[dict], tool_choice, parallel: bool = True) -> StructuredOutput | None:
    """The constraint for tool_choice, or None when the model may answer freely ("auto", "none")."""
    name = named_tool(tool_choice)
    if name is not None:
        tool = next((t for t in tools if t.get("function", t).get("name") == name), None)
        if tool is None:
            raise ValueError(f"tool_choice names {name!r}, which is not among the tools: {tool_names(tools)}")
        return StructuredOutput.from_schema(_parameters(tool), strict=True)
    if tool_choice != "required":
        return None
    if not tools:
        raise ValueError('tool_choice "required" needs at least one tool')
    item = {"anyOf": [{"type": "object", "properties": {"name": {"const": t.get("function", t)["name"]},
                                                         "parameters": _parameters(t)},
                       "required": ["name", "parameters"], "additionalProperties": False} for t in tools]}
    schema = {"type": "array", "items": item, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return StructuredOutput.from_schema(schema, strict=True)


def forced_calls(text: str, tool_choice) -> list[ToolCall]:
    """The calls in a constrained output (empty if it was cut short, e.g. by max_tokens)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    name = named_tool(tool_choice)
    if name is not None:
        return [ToolCall(name, json.dumps(value, ensure_ascii=False))]
    return [ToolCall(item["name"], json.dumps(item["parameters"], ensure_ascii=False)) for item in value]
