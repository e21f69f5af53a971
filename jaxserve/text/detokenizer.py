"""Incremental detokenization with stop strings.

Decoding token by token breaks multi-byte characters and loses the spaces that tokenizers attach to the
next token, so the text comes from the `tokenizers` library's DecodeStream, which decodes a short window of ids
with and without the new one and holds text back while it ends in an incomplete UTF-8 sequence (a few prompt
tokens are its left context). It costs about a tenth of two full decodes per token.
Stop strings are searched in the accumulated text, so they are found even when split across tokens;
streamed text holds back the last (longest stop - 1) characters, which could still begin a stop string.
Text is released in whole tokens, so a stream can send each token's logprobs in the chunk that carries its text:
each generated token owns the piece of text it completed (a token that ends inside a character owns "", the
one that completes it the whole character; tokens past a stop string own "").
"""

from __future__ import annotations

import bisect

from tokenizers.decoders import DecodeStream

# Prompt tokens kept as left context: enough for tokenizers that change a token's text by what precedes it.
_CONTEXT = 5


class Detokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str], skip_special_tokens: bool = True,
                 include_stop_str_in_output: bool = False):
        """tokenizer: a transformers fast tokenizer (its `backend_tokenizer` decodes)."""
        self.backend = tokenizer.backend_tokenizer
        context = list(prompt_token_ids[-_CONTEXT:])
        if "\ufffd" in self.backend.decode(context, skip_special_tokens=skip_special_tokens):
            context = []  # a context that ends inside a character would leak prompt bytes into the output
        self.stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.hold_back = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.num_emitted = 0  # characters of `text` already handed out by `take_delta`
        self.ends: list[int] = []  # per generated token whose text is settled: len(text) once its piece is in
        self.num_pending = 0  # appended tokens after those, whose text is not settled yet
        self.num_released = 0  # generated tokens whose pieces `take_delta` has handed out

    def append(self, token_id: int, check_stop: bool = True) -> str | None:
        """Adds one generated token; returns the stop string if the text now contains one (and cuts the text
        there). With check_stop False (before min_tokens) stop strings are let through."""
        new = self.stream.step(self.backend, token_id)
        if not new:  # None: inside a character; "": a skipped special token (or an id the tokenizer lacks)
            self.num_pending += 1
            return None
        search_from = max(0, len(self.text) - self.hold_back)
        self.ends += [len(self.text)] * self.num_pending
        self.text += new
        self.ends.append(len(self.text))
        self.num_pending = 0
        return self._find_stop(search_from) if check_stop else None

    def _find_stop(self, start: int) -> str | None:
        best = None
        for s in self.stop:
            at = self.text.find(s, start)
            if at != -1 and (best is None or at < best[0]):
                best = (at, s)
        if best is None:
            return None
        at, s = best
        self.text = self.text[: at + len(s) if self.include_stop else at]
        self.ends = [min(e, len(self.text)) for e in self.ends]
        return s

    def take_delta(self, finished: bool, num_tokens: int | None = None) -> str:
        """The text of the tokens not yet handed out, up to the last whole token that cannot be the start of a
        stop string. num_tokens: the sequence's generated tokens, counting those never appended (EOS, a stop
        token id); at the end they are released with no text."""
        if finished:
            total = len(self.ends) + self.num_pending if num_tokens is None else num_tokens
            self.ends += [len(self.text)] * (total - len(self.ends))
            self.num_pending = 0
            released = total
        else:
            limit = len(self.text) - self.hold_back if self.stop else len(self.text)
            released = max(self.num_released, bisect.bisect_right(self.ends, limit))
        end = self.ends[released - 1] if released else 0
        delta = self.text[self.num_emitted:end]
        self.num_emitted, self.num_released = end, released
        return delta

    def piece(self, j: int) -> str:
        """The text generated token j owns (settled tokens only)."""
        return self.text[self.ends[j - 1] if j else 0:self.ends[j]]
