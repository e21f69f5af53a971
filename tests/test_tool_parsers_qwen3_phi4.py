"""The qwen3_xml (Qwen3-Coder) and phi4_mini_json tool-call parsers: complete text, and streams cut at every character
boundary and at random token-like boundaries, whose deltas must add up to exactly the complete message."""

import json
import random

import pytest

from jaxserve.text.tool_parsers import PARSERS, parse, parser_for_template
from server.chat_output import ChatPlan, StreamShaper, final_message
from server.cli import build_parser

SCHEMAS = {
    "get_weather": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
    "configure": {"type": "object", "properties": {
        "ratio": {"type": "number"}, "dry_run": {"type": "boolean"}, "options": {"type": "object"},
        "tags": {"type": "array", "items": {"type": "string"}}, "limit": {"type": ["integer", "null"]},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}, "label": {"type": "string"}}},
    "write_file": {"type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}}},
}


def _xml(name, **params):
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


CODE = "x = '</parameter>'\ny = \"</function>\\n</tool_call>\"\n\nprint(x, y)"
CASES = {
    "qwen3_xml": [
        (_xml("get_weather", city="Paris", days=3), None, [("get_weather", '{"city": "Paris", "days": 3}')]),
        ("I'll check both cities.\n\n" + _xml("get_weather", city="Paris", days="3")
         + "\n<tool_call><function=get_weather><parameter=city>Rome</parameter></function></tool_call>",
         "I'll check both cities.",
         [("get_weather", '{"city": "Paris", "days": 3}'), ("get_weather", '{"city": "Rome"}')]),
        (_xml("configure", ratio=0.5, dry_run="true", options='{"a": [1, 2]}', tags='["x", "y"]', limit="null",
              note="null", label="42"), None,
         [("configure", '{"ratio": 0.5, "dry_run": true, "options": {"a": [1, 2]}, "tags": ["x", "y"], "limit": null, '
                        '"note": null, "label": "42"}')]),
        # Python literals, as Qwen3-Coder's template writes non-string values of earlier calls.
        (_xml("configure", dry_run="True", options="{'a': 1}", tags="['x']", limit=7), None,
         [("configure", '{"dry_run": true, "options": {"a": 1}, "tags": ["x"], "limit": 7}')]),
        # A value that is not its declared type, an undeclared parameter and a string that looks like JSON stay text.
        (_xml("get_weather", city="[1, 2]", days="three", extra=5), None,
         [("get_weather", '{"city": "[1, 2]", "days": "three", "extra": "5"}')]),
        (_xml("configure", ratio="1e400", dry_run="maybe", options="[1]", tags="{1, 2}", limit="2.5"), None,
         [("configure", '{"ratio": "1e400", "dry_run": "maybe", "options": "[1]", "tags": "{1, 2}", "limit": "2.5"}')]),
        (_xml("write_file", path="a.py", content=CODE), None,
         [("write_file", json.dumps({"path": "a.py", "content": CODE}))]),
        (_xml("undeclared_tool", n=1) + "\nDone.", "Done.", [("undeclared_tool", '{"n": "1"}')]),
        ("<tool_call>\n<function=ping>\n</function>\n</tool_call>", None, [("ping", "{}")]),
        ("<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</tool_call>",
         "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</tool_call>", []),  # no </function>: text
        ('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>',
         '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>', []),  # Hermes JSON is not this format
        ("Sure.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nPar",
         "Sure.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nPar", []),  # cut off mid-call
        ("Use <tool", "Use <tool", []),
    ],
    "phi4_mini_json": [
        ('functools[{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]', None,
         [("get_weather", '{"city": "Paris", "days": 3}')]),
        ('Let me check. functools[{"name": "a", "arguments": {}}, {"name": "b", "parameters": {"x": [1, 2]}}]',
         "Let me check.", [("a", "{}"), ("b", '{"x": [1, 2]}')]),
        ('functools[{"name": "a", "arguments": {"q": "[x]"}}] Done.', "Done.", [("a", '{"q": "[x]"}')]),
        ("import functools\nfunctools.reduce(add, xs)", "import functools\nfunctools.reduce(add, xs)", []),
        ('functools[{"name": "a", "arguments": {"x": 1', 'functools[{"name": "a", "arguments": {"x": 1', []),
        ('functools[{"arguments": {}}]', 'functools[{"arguments": {}}]', []),
        ("functools[]", "functools[]", []),
    ],
}
FLAT = [(parser, *case) for parser, cases in CASES.items() for case in cases]


@pytest.mark.parametrize("parser,text,want_content,want_calls", FLAT)
def test_complete_text(parser, text, want_content, want_calls):
    content, calls = parse(parser, text, tuple(SCHEMAS), SCHEMAS)
    assert content == want_content
    assert [(c.name, c.arguments) for c in calls] == want_calls


def test_qwen3_coder_is_the_same_parser_and_untyped_without_schemas():
    text = _xml("get_weather", city="Paris", days=3)
    content, calls = parse("qwen3_coder", text, (), SCHEMAS)
    assert content is None
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Paris", "days": 3}')]
    _, calls = parse("qwen3_xml", text)
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Paris", "days": "3"}')]


def _stream(plan, pieces):
    """Feeds the pieces; returns the deltas, checking on the way that the content shown so far never runs ahead of
    (or differs from) the complete message's content: no call markup leaks into content."""
    shaper, deltas, shown = StreamShaper(plan), [], ""
    final_content = final_message(plan, "".join(pieces), "stop")[0]["content"] or ""
    for i, piece in enumerate(pieces):
        new = shaper.feed(piece, final=i == len(pieces) - 1)
        shown += "".join(d.get("content", "") for d in new)
        assert final_content.startswith(shown.strip())
        deltas += new
    return deltas


def _assemble(deltas):
    """Content and calls from OpenAI deltas; each call's first delta carries its id, type and name, and no more
    arguments than the empty string."""
    content, calls = "", []
    for d in deltas:
        content += d.get("content", "")
        for tc in d.get("tool_calls", []):
            if "id" in tc:
                assert tc["index"] == len(calls) and tc["type"] == "function" and tc["function"]["arguments"] == ""
                assert tc["id"].startswith("call_")
                calls.append({"id": tc["id"], "name": tc["function"]["name"], "arguments": ""})
            else:
                assert tc["index"] == len(calls) - 1 and set(tc["function"]) == {"arguments"}
                calls[-1]["arguments"] += tc["function"]["arguments"]
    return content, calls


def _splits(text):
    yield list(text) + [""]
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    rng = random.Random(len(text))
    for _ in range(20):  # token-like pieces: mostly short, sometimes longer
        pieces, at = [], 0
        while at < len(text):
            n = rng.choice((1, 1, 2, 3, 4, 6, 9))
            pieces.append(text[at:at + n])
            at += n
        yield pieces or [""]


@pytest.mark.parametrize("parser,text,want_content,want_calls", FLAT)
def test_stream_deltas_add_up_to_the_complete_message(parser, text, want_content, want_calls):
    plan = ChatPlan(tool_parser=parser, tool_names=tuple(SCHEMAS), tool_schemas=SCHEMAS)
    message, finish = final_message(plan, text, "stop")
    assert message["content"] == want_content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == want_calls
    assert finish == ("tool_calls" if want_calls else "stop")
    for pieces in _splits(text):
        content, calls = _assemble(_stream(plan, pieces))
        assert (content.strip() or None if want_calls else content.strip()) == want_content
        assert [(c["name"], c["arguments"]) for c in calls] == want_calls
        assert len({c["id"] for c in calls}) == len(calls)


def test_parser_guessed_from_qwen3_coder_template():
    assert parser_for_template("<tool_call>\\n<function=example_function_name>\\n<parameter=") == "qwen3_xml"
    assert parser_for_template("<function=name>{...}</function> and <tool_call>") == "hermes"


@pytest.mark.parametrize("name", PARSERS)
def test_every_parser_is_a_cli_choice(name):
    args = build_parser().parse_args(["serve", "--tool-call-parser", name])
    assert args.tool_call_parser == name
