"""Grammar compilation, masks and forced tool-call schemas (host side)."""

import json

import numpy as np
import pytest

import tiny
from jaxserve.text.reasoning import ABSENT, CLOSED, OPENED
from jaxserve.text.structured_output import GrammarCompiler, GrammarState, InvalidGrammar, StructuredOutput
from jaxserve.text.tool_choice import forced_calls, forced_structure

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PING = {"type": "function", "function": {"name": "ping"}}


@pytest.fixture(scope="module")
def compiler():
    tok = tiny.make_tokenizer(300)
    return GrammarCompiler(tok, vocab_size=320), tok  # the model's vocab may be larger than the tokenizer's


def _allowed(row, vocab):
    return {t for t in range(vocab) if (int(row[t // 32]) >> (t % 32)) & 1}


def _walk(compiler, tok, spec, text, reasoning=None):
    """Feeds `text`'s tokens through the grammar, checking each was allowed; returns the final state."""
    c, _ = compiler
    state = GrammarState(c, spec, reasoning)
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
    from jaxserve.text.structured_output import close_objects

    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"x": {"type": "integer"}}},
                                               "b": {"type": "object", "additionalProperties": True},
                                               "free": {"type": "object"}, "empty": {"type": "object",
                                                                                     "properties": {}}}}
    closed = close_objects(schema)
    assert closed["additionalProperties"] is False and closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["b"]["additionalProperties"] is True and "additionalProperties" not in schema
    # Objects that list no properties stay free-form: closing them would allow only {}.
    assert closed["properties"]["free"] == {"type": "object"}
    assert closed["properties"]["empty"] == {"type": "object", "properties": {}}


def _greedy_text(compiler, spec, pick):
    """Generates with the grammar alone: at each step `pick` chooses among the allowed tokens' texts."""
    c, tok = compiler
    state = GrammarState(c, spec)
    row = np.zeros(c.words, np.int32)
    text = ""
    while True:
        state.fill(row)
        allowed = sorted(_allowed(row, c.vocab_size))
        if allowed == [tok.eos_token_id]:
            return text
        t = pick(text, {a: tok.decode([a]) for a in allowed if a != tok.eos_token_id})
        state.accept(t)
        text += tok.decode([t])


def _first_key_text(texts):
    """Prefers a token that opens a string or a key's first letter; otherwise the shortest text."""
    return min(texts, key=lambda t: (len(texts[t]) != 1, texts[t]))


def test_properties_come_in_schema_order(compiler):
    """llguidance generates properties in the order the schema lists them; sorting keys reorders them."""
    schema = {"type": "object", "properties": {"zeta": {"type": "integer"}, "alpha": {"type": "integer"},
                                               "mid": {"type": "integer"}},
              "required": ["zeta", "alpha", "mid"], "additionalProperties": False}
    spec = StructuredOutput.from_schema(schema)
    assert list(json.loads(spec.json)["properties"]) == ["zeta", "alpha", "mid"]
    text = _greedy_text(compiler, spec, lambda _, texts: _first_key_text(texts))
    assert list(json.loads(text)) == ["zeta", "alpha", "mid"] and text.startswith('{"zeta": ')
    c, tok = compiler  # the sorted order is not allowed at all
    with pytest.raises(AssertionError):
        _walk(compiler, tok, spec, '{"alpha": ')
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    named = json.loads(forced_structure([tool], {"type": "function", "function": {"name": "f"}}).json)
    required = json.loads(forced_structure([tool], "required").json)
    assert list(named["properties"]) == list(required["$defs"]["tool0"]["properties"]) == ["zeta", "alpha", "mid"]


FREE = {"type": "function", "function": {"name": "store", "parameters": {
    "type": "object", "properties": {"data": {"type": "object"}}, "required": ["data"]}}}


def test_forced_tools_close_objects_only_under_strict(compiler):
    c, tok = compiler
    named = {"type": "function", "function": {"name": "store"}}
    call = '{"data": {"x": 1}}'
    _walk(compiler, tok, forced_structure([FREE], named), call)  # a free-form object takes any keys
    _walk(compiler, tok, forced_structure([FREE], "required"), f'[{{"name": "store", "parameters": {call}}}]')
    strict = {"type": "function", "function": {**FREE["function"], "strict": True,
                                               "parameters": {**FREE["function"]["parameters"],
                                                              "properties": {"data": {"type": "object"}, "n": {
                                                                  "type": "integer"}}}}}
    _walk(compiler, tok, forced_structure([strict], named), call)  # still free-form inside: it lists nothing
    with pytest.raises(AssertionError):  # but the strict top level takes no invented key
        _walk(compiler, tok, forced_structure([strict], named), '{"data": {}, "zz')
    _walk(compiler, tok, forced_structure([FREE], named), '{"data": {}, "zz": 1}')  # without strict it would
    with pytest.raises(AssertionError):  # a function without parameters takes none
        _walk(compiler, tok, forced_structure([PING], {"type": "function", "function": {"name": "ping"}}), '{"')


PYDANTIC = {"type": "function", "function": {"name": "order", "parameters": {
    "$defs": {"Opt": {"type": "object", "properties": {"size": {"enum": ["S", "L"]}}, "required": ["size"],
                      "additionalProperties": False},
              "Node": {"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#/$defs/Node"},
                                                                           {"type": "null"}]}},
                       "required": ["next"], "additionalProperties": False}},
    "type": "object", "properties": {"opt": {"$ref": "#/$defs/Opt"}, "chain": {"$ref": "#/$defs/Node"}},
    "required": ["opt", "chain"], "additionalProperties": False}}}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "order"}}])
def test_forced_tools_resolve_defs_and_recursive_refs(compiler, choice):
    c, tok = compiler
    args = '{"opt": {"size": "L"}, "chain": {"next": {"next": null}}}'
    text = args if isinstance(choice, dict) else f'[{{"name": "ping", "parameters": {{}}}}, {{"name": "order", ' \
                                                 f'"parameters": {args}}}]'
    spec = forced_structure([PING, PYDANTIC], choice)
    c.grammar(spec)  # compiles: every pointer resolves inside the combined schema
    state, allowed = _walk(compiler, tok, spec, text)
    assert allowed == {tok.eos_token_id}
    with pytest.raises(AssertionError):  # the referenced schema is enforced, not skipped
        _walk(compiler, tok, spec, text.replace('"L"', '"M"'))
    assert [(x.name, json.loads(x.arguments)) for x in forced_calls(text, choice)][-1] == ("order", json.loads(args))


def test_constraint_starts_after_the_reasoning_the_prompt_opened(compiler):
    c, tok = compiler
    spec = StructuredOutput(json=json.dumps(WEATHER["function"]["parameters"]))
    state, allowed = _walk(compiler, tok, spec, 'Let me think: a city.</think>\n{"city": "Paris"}', OPENED)
    assert allowed == {tok.eos_token_id} and state.matcher.is_accepting()
    state = GrammarState(c, spec, OPENED)  # after the marker, only the schema is allowed
    with pytest.raises(RuntimeError, match="broke the grammar"):
        for t in tok.encode("thinking</think>\nnot json", add_special_tokens=False):
            state.accept(t)


def test_optional_think_block_when_the_prompt_has_none(compiler):
    c, tok = compiler
    spec = StructuredOutput(json=json.dumps(WEATHER["function"]["parameters"]))
    for text in ('{"city": "Paris"}', '<think>hmm, Paris.</think>\n{"city": "Paris"}', '\n<think>x</think>{"city": "R"}'):
        state, allowed = _walk(compiler, tok, spec, text, ABSENT)
        assert allowed == {tok.eos_token_id} and state.matcher.is_accepting()
    for reasoning in (ABSENT, CLOSED, None):  # neither prose nor (after a closed block) a new think block
        bad = ["Sure! {"] + ([] if reasoning == ABSENT else ["<think>"])
        for text in bad:
            with pytest.raises(AssertionError):
                _walk(compiler, tok, spec, text, reasoning)


def _force_sequence(state, c):
    """The tokens the budget forces, read from the rows one at a time."""
    row = np.zeros(c.words, np.int32)
    forced = []
    while state.fill(row) and len(_allowed(row, c.vocab_size)) == 1:
        (t,) = _allowed(row, c.vocab_size)
        forced.append(t)
        state.accept(t)
    return forced


@pytest.mark.parametrize("budget", [0, 1, 5])
def test_thinking_budget_forces_the_end_marker(compiler, budget):
    c, tok = compiler
    close = list(c.close_ids)
    assert len(close) > 1  # the tiny tokenizer spells "</think>" in several tokens: each is forced in turn
    words = tok.encode(" the quick brown fox jumps over the lazy dog again", add_special_tokens=False)
    state = GrammarState(c, None, OPENED, thinking_budget=budget)
    row = np.zeros(c.words, np.int32)
    for t in words[:budget]:
        assert not state.fill(row)  # unconstrained while the budget lasts
        state.accept(t)
    assert _force_sequence(state, c) == close
    assert not state.fill(row) and state.budget.spent == budget  # then the answer is free again
    # Before any think block (ABSENT) the budget starts counting at the token that opens one.
    state = GrammarState(c, None, ABSENT, thinking_budget=budget)
    for t in tok.encode("<think>", add_special_tokens=False) + words[:budget]:
        state.accept(t)
    assert _force_sequence(state, c) == close
    state = GrammarState(c, None, ABSENT, thinking_budget=budget)
    for t in words:  # an answer without a think block is never interrupted
        assert not state.fill(row)
        state.accept(t)
    state = GrammarState(c, None, CLOSED, thinking_budget=budget)
    assert state.budget is None


def test_thinking_budget_then_the_constraint(compiler):
    c, tok = compiler
    state = GrammarState(c, StructuredOutput(json=json.dumps(WEATHER["function"]["parameters"])), OPENED,
                         thinking_budget=3)
    for t in tok.encode(" one two three", add_special_tokens=False)[:3]:
        state.accept(t)
    assert _force_sequence(state, c) == list(c.close_ids)
    for t in tok.encode('{"city": "Oslo"}', add_special_tokens=False):
        state.accept(t)
    assert state.matcher.is_accepting()


def test_a_budget_ending_inside_a_character_completes_it_first(compiler):
    """Under a grammar (whole UTF-8 characters only) the marker waits until the character is complete."""
    c, tok = compiler
    char = next(ch for ch in "日本語🙂Ü" if len(tok.encode(ch, add_special_tokens=False)) > 1)
    pieces = tok.encode(char, add_special_tokens=False)
    state = GrammarState(c, StructuredOutput(json_object=True), OPENED, thinking_budget=1)
    row = np.zeros(c.words, np.int32)
    state.accept(pieces[0])  # the budget is spent inside the character
    state.fill(row)
    assert set(pieces[1:2]) <= _allowed(row, c.vocab_size) and len(_allowed(row, c.vocab_size)) > 1
    for t in pieces[1:]:
        state.accept(t)
    assert _force_sequence(state, c) == list(c.close_ids)
    assert state.budget.spent == len(pieces)
