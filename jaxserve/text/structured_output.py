"""Constrained decoding: JSON schemas, regexes, choices and grammars become per-token masks.

The grammar engine is llguidance, on the host, without torch. Measured here on SmolLM2's 49k-token vocabulary
(a 3-field JSON schema): llguidance compiles a schema in 0.85 ms and computes a mask in 48 us on average
(1 ms worst case); xgrammar took 4.3 ms to compile and 7 us per mask, but its mask API needs torch. Schemas
arrive with each request, so compile time matters more than a mask cost that is 0.1% of a 50 ms step.

Each constrained sequence owns a matcher. Before a step that samples for it, its row of the step's bitmask
[S, ceil(V/32)] is filled (bit t of a row allows token t); the sampler applies the rows on device. After the
step, the sampled token advances the matcher. When the grammar is complete only EOS is allowed, so the
sequence ends with finish_reason "stop".

For a reasoning request the constraint follows the think block where the prompt leaves one (reasoning.OPENED:
free text through `</think>`; ABSENT: an optional `<think>...</think>` first; CLOSED: the constraint from the
first token). A thinking budget rides on the same masks: once a sequence has spent it inside its think block,
its rows allow only the closing marker's tokens, one by one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re

import numpy as np

from jaxserve.text.reasoning import ABSENT, CLOSE, OPEN, OPENED


# JSON as json.dumps writes it. Free whitespace would let a weak model pad with newlines until max_tokens;
# a schema can still ask for it with its own "x-guidance" options.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class InvalidGrammar(ValueError):
    """The schema, regex or grammar cannot be compiled (the message says why): a 400 for the client."""


@dataclasses.dataclass(frozen=True)
class StructuredOutput:
    """Exactly one of the fields is set (vLLM's `structured_outputs` / guided_* options)."""

    json: str | None = None  # a JSON schema, serialized
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None  # llguidance's Lark dialect (close to EBNF)

    def __post_init__(self):
        given = [self.json is not None, self.json_object, self.regex is not None, self.choice is not None,
                 self.grammar is not None]
        if sum(given) != 1:
            raise ValueError("structured output needs exactly one of json, json_object, regex, choice, grammar")
        if self.choice is not None and not self.choice:
            raise ValueError("choice needs at least one option")

    @classmethod
    def from_schema(cls, schema: dict, strict: bool = False) -> "StructuredOutput":
        """strict: objects take no properties beyond those listed unless they say otherwise (OpenAI's strict
        mode), so a model cannot keep inventing keys until max_tokens. Keys keep the caller's order: llguidance
        generates properties in schema order, and "reasoning first, answer last" schemas depend on it."""
        return cls(json=json.dumps(close_objects(schema) if strict else schema))

    def to_grammar(self, reasoning: str | None = None) -> str:
        """The llguidance grammar text for this constraint, after the think block that `reasoning` (a
        reasoning.* state of the prompt) leaves room for. A Lark grammar is taken as given: it starts at once."""
        from llguidance import LLMatcher

        if reasoning in (OPENED, ABSENT) and self.grammar is None:
            return LLMatcher.grammar_from_lark(self._after_reasoning(reasoning))
        if self.json is not None:
            return LLMatcher.grammar_from_json_schema(json.loads(self.json), defaults=_JSON_STYLE)
        if self.json_object:
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_STYLE)
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in self.choice))
        return LLMatcher.grammar_from_lark(self.grammar)

    def _after_reasoning(self, reasoning: str) -> str:
        """Lark: the think block (through its end marker, matched lazily; optional unless the prompt opened
        it), then the constrained answer."""
        if self.json is not None or self.json_object:
            schema = json.loads(self.json) if self.json is not None else {"type": "object"}
            body = "%json " + json.dumps({"x-guidance": _JSON_STYLE, **schema})
        else:
            pattern = self.regex if self.regex is not None else "|".join(re.escape(c) for c in self.choice)
            body = "/" + pattern.replace("/", "\\/") + "/"
        end = re.escape(CLOSE).replace("/", "\\/")
        if reasoning == OPENED:  # the output starts inside the block
            start, think = "think sep answer", f"/(?s:.*){end}/"
        else:
            start, think = "answer | think sep answer", f"/[ \\n]*{re.escape(OPEN)}(?s:.*){end}/"
        return f"start: {start}\nthink[lazy]: {think}\nsep: /[ \\n]*/\nanswer: {body}\n"


def close_objects(schema):
    """A copy of `schema` with additionalProperties false on every object schema that lists properties and
    does not set it."""
    if isinstance(schema, list):
        return [close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: close_objects(v) for k, v in schema.items()}
    # An object that lists no properties is free-form by intent ({"type": "object"}): closing it would allow
    # only {}.
    if out.get("properties") and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


class GrammarCompiler:
    """Builds matchers for one tokenizer. The llguidance tokenizer (~0.2 s to build) is made on first use."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.words = -(-vocab_size // 32)  # int32 words per bitmask row

    @functools.cached_property
    def _lltokenizer(self):
        import llguidance.hf

        return llguidance.hf.from_tokenizer(self.tokenizer)

    @functools.lru_cache(maxsize=256)
    def grammar(self, spec: StructuredOutput, reasoning: str | None = None) -> str:
        """Compiles and validates; raises InvalidGrammar with the engine's reason."""
        from llguidance import LLMatcher

        try:
            grammar = spec.to_grammar(reasoning)
        except (ValueError, TypeError) as e:
            raise InvalidGrammar(f"invalid structured output: {e}") from None
        error = LLMatcher.validate_grammar(grammar, self._lltokenizer)
        if error:
            raise InvalidGrammar(f"invalid structured output: {error.strip()}")
        return grammar

    def matcher(self, spec: StructuredOutput, reasoning: str | None = None):
        from llguidance import LLMatcher

        return LLMatcher(self._lltokenizer, self.grammar(spec, reasoning))

    def fill(self, matcher, row: np.ndarray) -> None:
        """Writes the allowed-token bits for the matcher's next token into `row` [words] int32."""
        import llguidance.numpy

        width = llguidance.numpy.get_bitmask_shape(1, self._lltokenizer.vocab_size)[1]
        view = row[None, :width]
        llguidance.numpy.fill_next_token_bitmask(matcher, view, 0)
        row[width:] = 0  # ids past the tokenizer's vocabulary (padding rows of the embedding) stay banned

    @functools.cached_property
    def close_ids(self) -> tuple[int, ...]:
        """The tokens of the reasoning end marker, as a budget forces them."""
        return tuple(self.tokenizer.encode(CLOSE, add_special_tokens=False))

    @functools.lru_cache(maxsize=None)
    def token_text(self, token: int) -> str:
        """One token decoded alone (logprob alternatives, thinking budgets), cached."""
        return self.tokenizer.decode([token])


class ThinkingBudget:
    """Counts the tokens a sequence generates inside its think block (after the token that opens it, before the
    one that closes it); once `budget` are spent, the closing marker's tokens are forced, and the answer follows.
    Under a grammar (which accepts only whole UTF-8 characters) a budget that ends inside a character lets the
    grammar's own masks complete it first, at most 3 more tokens."""

    def __init__(self, compiler: GrammarCompiler, budget: int, opened: bool, whole_characters: bool = False):
        self.compiler = compiler
        self.budget = budget
        self.whole_characters = whole_characters
        self.recent: list[int] = []  # the last tokens, to see whether the text ends inside a character
        self.inside = True if opened else None  # None: not yet known whether the output opens a block
        self.text = ""  # the output's start (until it shows whether it opens a block), then the block's last chars
        self.spent = 0
        self.forcing: list[int] = []  # marker tokens still to force
        if opened:
            self._check_spent()

    def accept(self, token: int) -> None:
        if self.forcing:
            self.forcing.pop(0)
            if not self.forcing:
                self.inside = False
            return
        if self.inside is False:
            return
        self.recent = (self.recent + [token])[-4:]
        self.text += self.compiler.token_text(token)
        if self.inside is None:
            head = self.text.lstrip(" \n")
            if not head.startswith(OPEN):
                if not OPEN.startswith(head):
                    self.inside = False  # the output is an answer without a think block
                return
            self.inside, self.text = True, head[len(OPEN):]  # the token that opens the block is not counted
        else:
            self.spent += 1
        if CLOSE in self.text:
            self.inside = False
            return
        self.text = self.text[-len(CLOSE):]
        self._check_spent()

    def _check_spent(self) -> None:
        if self.spent >= self.budget and not (
                self.whole_characters and self.recent
                and self.compiler.tokenizer.decode(self.recent).endswith("\ufffd")):
            self.forcing = list(self.compiler.close_ids)


class GrammarState:
    """One sequence's host-side token constraints, applied through the sampler's mask rows: its grammar (None:
    unconstrained), its thinking budget and its bad words (bad_words.BadWords); each may be absent."""

    def __init__(self, compiler: GrammarCompiler, spec: StructuredOutput | None, reasoning: str | None = None,
                 thinking_budget: int | None = None, bad_words=None):
        self.compiler = compiler
        self.matcher = compiler.matcher(spec, reasoning) if spec is not None else None
        self.budget = (ThinkingBudget(compiler, thinking_budget, reasoning == OPENED, self.matcher is not None)
                       if thinking_budget is not None and reasoning in (OPENED, ABSENT) else None)
        self.bad_words = bad_words

    def fill(self, row: np.ndarray) -> bool:
        """Writes the next token's allowed bits into `row`; returns False (row untouched) when nothing is banned."""
        bits = row.view(np.uint32)
        if self.budget is not None and self.budget.forcing:
            token = self.budget.forcing[0]
            row[:] = 0
            bits[token // 32] = np.uint32(1 << (token % 32))
            return True
        banned = self.bad_words.banned() if self.bad_words is not None else []
        if self.matcher is not None:
            self.compiler.fill(self.matcher, row)
        elif banned:
            row[:] = -1
        else:
            return False
        for token in banned:
            bits[token // 32] &= np.uint32(~(1 << (token % 32)) & 0xFFFFFFFF)
        return True

    def accept(self, token: int) -> None:
        if self.matcher is not None and not self.matcher.is_stopped():  # stopped: the token is EOS (or ignored)
            if not self.matcher.consume_token(token):
                raise RuntimeError(f"token {token} broke the grammar: {self.matcher.get_error()}")
        if self.budget is not None:
            self.budget.accept(token)
        if self.bad_words is not None:
            self.bad_words.accept(token)
