"""bad_words (vLLM's option): words the output must never contain, enforced as token sequences.

A word is banned in the spellings a tokenizer gives it at the start of the text and after a space. Its last token
is masked whenever the output so far ends with the tokens before it (a one-token word is masked always), so the
sequence can never be completed; the same text spelled with other tokens is not caught, as in vLLM.
"""

from __future__ import annotations


def token_sequences(tokenizer, words: list[str]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tuple(tokenizer.encode(text, add_special_tokens=False))
            if ids and ids not in out:
                out.append(ids)
    return out


class BadWords:
    """One sequence's view: which tokens would complete a banned sequence next."""

    def __init__(self, sequences: list[tuple[int, ...]]):
        self.sequences = sequences
        self.keep = max(len(s) for s in sequences) - 1  # output tokens a prefix can span
        self.tail: list[int] = []

    def banned(self) -> list[int]:
        return [s[-1] for s in self.sequences if len(s) == 1 or tuple(self.tail[-(len(s) - 1):]) == s[:-1]]

    def accept(self, token: int) -> None:
        if self.keep:
            self.tail = (self.tail + [token])[-self.keep:]
