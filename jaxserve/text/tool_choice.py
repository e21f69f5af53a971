"""Forced tool calls: tool_choice "required" or a named function constrain the output with a JSON schema,
so the arguments always parse and validate against the tool's parameters, whatever the model.

A named function's output is its arguments object itself. "required" produces a JSON list of
{"name", "parameters"} items, one branch per tool (at most one item when parallel_tool_calls is false).
Objects are closed (no keys beyond those listed) only for functions marked `strict: true`, as OpenAI's strict
mode; a function without parameters takes none.
"""

from __future__ import annotations

import json

from jaxserve.text.structured_output import StructuredOutput, close_objects
from jaxserve.text.tool_parsers import ToolCall


def _parameters(tool: dict) -> dict:
    """The function's parameters schema, closed under its `strict: true`."""
    function = tool.get("function", tool)
    params = function.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
    return close_objects(params) if function.get("strict") else params


_DEF_KEYS = ("$defs", "definitions")


def _hoisted(params: dict, prefix: str, defs: dict) -> dict:
    """`params` made valid inside a bigger schema: its own definitions move into `defs` under names starting
    with `prefix`, and its local references ("#", "#/$defs/X", "#/definitions/X") are rewritten to point
    there. The parameters themselves become defs[prefix], so a recursive reference to "#" still resolves
    (references are kept, never inlined, so recursion cannot loop)."""
    def rewrite(node):
        if isinstance(node, list):
            return [rewrite(x) for x in node]
        if not isinstance(node, dict):
            return node
        out = {k: rewrite(v) for k, v in node.items()}
        ref = out.get("$ref")
        if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
            parts = ref[2:].split("/", 1) if ref != "#" else []
            if parts and parts[0] in _DEF_KEYS and len(parts) == 2:
                out["$ref"] = f"#/$defs/{prefix}.{parts[1]}"  # prefix has no "/" or "~": the pointer stays valid
            else:
                out["$ref"] = f"#/$defs/{prefix}" + (ref[1:] if ref != "#" else "")
        return out

    body = {k: v for k, v in params.items() if k not in _DEF_KEYS}
    for key in _DEF_KEYS:
        for name, schema in (params.get(key) or {}).items():
            defs[f"{prefix}.{name}"] = rewrite(schema)
    defs[prefix] = rewrite(body)
    return {"$ref": f"#/$defs/{prefix}"}


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
        return StructuredOutput.from_schema(_parameters(tool))  # the schema's root: its own refs resolve
    if tool_choice != "required":
        return None
    if not tools:
        raise ValueError('tool_choice "required" needs at least one tool')
    defs: dict = {}
    item = {"anyOf": [{"type": "object", "properties": {"name": {"const": t.get("function", t)["name"]},
                                                         "parameters": _hoisted(_parameters(t), f"tool{i}", defs)},
                       "required": ["name", "parameters"], "additionalProperties": False}
                      for i, t in enumerate(tools)]}
    schema = {"type": "array", "items": item, "minItems": 1, "$defs": defs}
    if not parallel:
        schema["maxItems"] = 1
    return StructuredOutput.from_schema(schema)


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
