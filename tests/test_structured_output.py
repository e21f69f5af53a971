"""Grammar compilation, masks and forced tool-call schemas (host side)."""

import json

import numpy as np
import pytest

import tiny
from jaxserve.structured_output import GrammarCompiler, GrammarState, InvalidGrammar, StructuredOutput
from jaxserve.tool_choice import forced_calls, forced_structure

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PING = {"type": "function", "function": {"name": "ping"}}


@pytest.fixture(scope="module")
def compiler():
    tok = tiny.make_tokenizer(300)
    return GrammarCompiler(tok, vocab_size=320), tok  # the model's vocab may be larger than the tokenizer's


def _allowed(row, vocab):
    return {t for t in range(vocab) if (int(row[t // 32]) >> (t % 32)) & 1}


def _walk(compiler, tok, spec, text):
    """Feeds `text`'s tokens through the grammar, checking each was allowed; returns the final state."""
    c, _ = compiler
    state = GrammarState(c, spec)
    row = np.zeros(c.words, np.int32)
    for t in tok.encode(text, add_special_tokens=False):
        state.fill(row)
        assert t in _allowed(row, c.vocab_size)
        state.accept(t)
    state.fill(row)
    return state, _allowed(row, c.vocab_size)


def test_json_schema_allows_valid_and_ends_with_eos(compiler):
    c, tok = compiler
    spec = StructuredOutput.from_schema({"type": "object", "properties": {"n": {"type": "integer"}},
                                         "required": ["n"], "additionalProperties": False})
    state, allowed = _walk(compiler, tok, spec, '{"n": 12}')
    assert allowed == {tok.eos_token_id}
    assert not any(t >= 300 for t in range(c.vocab_size) if t in allowed)


def test_mask_forbids_what_the_grammar_cannot_take(compiler):
    c, tok = compiler
    state = GrammarState(c, StructuredOutput(choice=("yes", "no")))
    row = np.zeros(c.words, np.int32)
    state.fill(row)
    allowed = _allowed(row, c.vocab_size)
    assert allowed and all(tok.decode([t]) and ("yes".startswith(tok.decode([t])) or "no".startswith(tok.decode([t])))
                           for t in allowed)
    with pytest.raises(RuntimeError, match="broke the grammar"):
        state.accept(tok.encode("maybe", add_special_tokens=False)[0])


@pytest.mark.parametrize("spec,reason", [
    (StructuredOutput(json=json.dumps({"type": "objectx"})), "objectx"),
    (StructuredOutput(regex="(unclosed"), "unclosed"),
    (StructuredOutput(grammar="start: undefined_rule"), "undefined_rule"),
])
def test_invalid_specs_name_the_reason(compiler, spec, reason):
    with pytest.raises(InvalidGrammar, match=reason):
        compiler[0].grammar(spec)


def test_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutput(regex="a", json_object=True)


def test_named_tool_choice(compiler):
    c, tok = compiler
    spec = forced_structure([WEATHER, PING], {"type": "function", "function": {"name": "get_weather"}})
    _walk(compiler, tok, spec, '{"city": "Paris"}')
    calls = forced_calls('{"city": "Paris"}', {"type": "function", "function": {"name": "get_weather"}})
    assert [(x.name, json.loads(x.arguments)) for x in calls] == [("get_weather", {"city": "Paris"})]
    with pytest.raises(ValueError, match="not among the tools"):
        forced_structure([WEATHER], {"type": "function", "function": {"name": "nope"}})


def test_required_tool_choice(compiler):
    c, tok = compiler
    spec = forced_structure([WEATHER, PING], "required", parallel=False)
    text = '[{"name": "ping", "parameters": {}}]'
    _walk(compiler, tok, spec, text)
    assert [(x.name, x.arguments) for x in forced_calls(text, "required")] == [("ping", "{}")]
    assert forced_structure([WEATHER], "auto") is None and forced_structure([WEATHER], "none") is None


def test_strict_schemas_close_objects():
    from jaxserve.structured_output import close_objects

    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {}},
                                               "b": {"type": "object", "additionalProperties": True}}}
    closed = close_objects(schema)
    assert closed["additionalProperties"] is False and closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["b"]["additionalProperties"] is True and "additionalProperties" not in schema


def test_constraint_starts_after_the_reasoning(compiler):
    c, tok = compiler
    spec = StructuredOutput(json=json.dumps(WEATHER["function"]["parameters"]), reasoning_end="</think>")
    state, allowed = _walk(compiler, tok, spec, 'Let me think: a city.</think>\n{"city": "Paris"}')
    assert allowed == {tok.eos_token_id} and state.matcher.is_accepting()
    state = GrammarState(c, spec)  # after the marker, only the schema is allowed
    with pytest.raises(RuntimeError, match="broke the grammar"):
        for t in tok.encode("thinking</think>\nnot json", add_special_tokens=False):
            state.accept(t)
