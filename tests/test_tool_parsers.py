"""Tool-call parsers on complete text and streamed split at every boundary, malformed output included."""

import json

import pytest

from jaxserve.text.tool_parsers import StreamingToolParser, parse, parser_for_template

W = {"city": "Paris", "unit": "c"}
CASES = {
    "hermes": [
        (f'<tool_call>{{"name": "get_weather", "arguments": {json.dumps(W)}}}</tool_call>', None, [("get_weather", W)]),
        ('Let me check.\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>{"name": "b", '
         '"arguments": {"x": [1, 2]}}</tool_call>', "Let me check.", [("a", {}), ("b", {"x": [1, 2]})]),
        ('<tool_call>{"name": "f", "arguments": "{\\"q\\": 1}"}</tool_call>', None, [("f", {"q": 1})]),
        ("Just text, no calls. 5 < 6 and <tool", "Just text, no calls. 5 < 6 and <tool", []),
        ('<tool_call>{"name": "f", "arguments": {"q": </tool_call>', '<tool_call>{"name": "f", "arguments": {"q": '
         '</tool_call>', []),  # invalid JSON inside: plain text
        ('Sure <tool_call>{"name": "f", "argum', 'Sure <tool_call>{"name": "f", "argum', []),  # cut off mid-call
        ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),  # no name
    ],
    "llama3_json": [
        ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}', None, [("get_weather", W)]),
        ('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "arguments": {"k": true}}', None,
         [("a", {}), ("b", {"k": True})]),
        ("The weather is nice.", "The weather is nice.", []),
        ('{"name": "a", "parameters": {"x": 1}', '{"name": "a", "parameters": {"x": 1}', []),
        ('{"name": "a", "parameters": {}}; {"name": "b", "param', '{"name": "b", "param', [("a", {})]),
        ('{"not": "a call"}', '{"not": "a call"}', []),
    ],
    "mistral": [
        (f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {json.dumps(W)}}}]', None, [("get_weather", W)]),
        ('Checking. [TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"y": "z"}}]',
         "Checking.", [("a", {}), ("b", {"y": "z"})]),
        ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "c"}', None, [("get_weather", W)]),
        ("No tools [TOOL", "No tools [TOOL", []),
        ('[TOOL_CALLS] [{"name": "a", "arguments": ', '[TOOL_CALLS] [{"name": "a", "arguments": ', []),
    ],
    "pythonic": [
        ('[get_weather(city="Paris", unit="c")]', None, [("get_weather", W)]),
        ('[a(), b(x=[1, 2], y={"k": None})]', None, [("a", {}), ("b", {"x": [1, 2], "y": {"k": None}})]),
        ("[1] is a citation", "[1] is a citation", []),
        ('[f(x=__import__("os").system("id"))]', '[f(x=__import__("os").system("id"))]', []),  # nothing evaluated
        ("Plain answer.", "Plain answer.", []),
    ],
}
FLAT = [(parser, *case) for parser, cases in CASES.items() for case in cases]


def _check(content, calls, want_content, want_calls):
    assert content == (want_content.strip() if want_content is not None else None)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == want_calls
    assert len({c.id for c in calls}) == len(calls) and all(c.id.startswith("call_") for c in calls)


@pytest.mark.parametrize("parser,text,want_content,want_calls", FLAT)
def test_complete_text(parser, text, want_content, want_calls):
    _check(*parse(parser, text), want_content, want_calls)


def _stream(parser, pieces):
    s = StreamingToolParser(parser)
    content, calls = "", []
    for i, piece in enumerate(pieces):
        c, new = s.feed(piece, final=i == len(pieces) - 1)
        content += c
        calls += new
    return content, calls


@pytest.mark.parametrize("parser,text,want_content,want_calls", FLAT)
def test_streamed_at_every_boundary(parser, text, want_content, want_calls):
    splits = [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text) + [""]]
    for pieces in splits:
        content, calls = _stream(parser, pieces)
        _check(content.strip() or None if want_calls else content.strip(), calls, want_content, want_calls)


def test_streamed_content_never_shows_a_call_marker_early():
    s = StreamingToolParser("hermes")
    shown = ""
    for ch in 'Hi <tool_call>{"name": "f", "arguments": {}}</tool_call>':
        c, _ = s.feed(ch)
        shown += c
        assert "<" not in shown


def test_parser_guessed_from_template():
    assert parser_for_template("... <tool_call> ...") == "hermes"
    assert parser_for_template('{{- "Environment: ipython" }} "parameters"') == "llama3_json"
    assert parser_for_template("[TOOL_CALLS]") == "mistral"
    assert parser_for_template(None) == "hermes"
