"""Incremental detokenization: never broken UTF-8, stop strings found across token boundaries."""

import random

import pytest

import tiny
from jaxserve.text.detokenizer import Detokenizer

TEXTS = ["Ünïcödé tëxt, 日本語, emoji 🙂 and symbols", "Hello world! 🙂🙂 The quick brown fox. 12345",
         "jax serve 日本語 tpu gpu cpu"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.make_tokenizer(300)


def _stream(tokenizer, ids, stop=(), include=False):
    d = Detokenizer(tokenizer, [tokenizer.bos_token_id], list(stop), True, include)
    pieces, found = [], None
    for t in ids:
        found = d.append(t)
        pieces.append(d.take_delta(found is not None))
        if found:
            break
    pieces.append(d.take_delta(True))
    return d, pieces, found


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_are_valid_text_and_add_up(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    # A byte-level BPE with a 300-token vocabulary splits multi-byte characters across tokens.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    d, pieces, _ = _stream(tokenizer, ids)
    assert "".join(pieces) == d.text == text
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("seed", range(5))
def test_stop_strings_across_token_boundaries(tokenizer, seed):
    text = TEXTS[1]
    ids = tokenizer.encode(text, add_special_tokens=False)
    rng = random.Random(seed)
    start = rng.randrange(1, len(text) - 6)
    stop = text[start:start + rng.randint(2, 6)]
    d, pieces, found = _stream(tokenizer, ids, stop=[stop, "never there"])
    assert found == stop
    assert "".join(pieces) == d.text == text[:text.index(stop)]
    d, pieces, _ = _stream(tokenizer, ids, stop=[stop], include=True)
    assert "".join(pieces) == text[:text.index(stop) + len(stop)]


def test_streamed_text_never_shows_a_partial_stop_string(tokenizer):
    text = "Hello world! The quick brown fox."
    ids = tokenizer.encode(text, add_special_tokens=False)
    stop = "brown fox"
    d, pieces, found = _stream(tokenizer, ids, stop=[stop])
    streamed = ""
    for p in pieces:
        streamed += p
        assert "brown" not in streamed  # held back until it is clear whether the stop string follows
    assert found == stop and streamed == "Hello world! The quick "


def test_a_prompt_cut_inside_a_character_leaks_nothing(tokenizer):
    """The prompt's last tokens are the decoder's left context; when they end inside a character, none of their
    bytes may surface in the output."""
    partial = tokenizer.encode("日本", add_special_tokens=False)[:-1]
    assert "\ufffd" in tokenizer.decode(partial)
    d = Detokenizer(tokenizer, partial, [], True, False)
    for t in tokenizer.encode("Hello world", add_special_tokens=False):
        d.append(t)
    assert d.take_delta(True) == d.text == "Hello world"
