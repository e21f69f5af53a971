"""Reasoning parsers: split `<think>...</think>` from the answer, complete or streamed.

`qwen3`: the reasoning, when present, is wrapped in `<think>` and `</think>` in the output (with
enable_thinking false there is none). `deepseek_r1`: the chat template already opens `<think>` in the prompt,
so the output starts inside the reasoning and only `</think>` marks its end (a leading `<think>` is tolerated).
"""

from __future__ import annotations

from jaxserve.tool_parsers import partial_marker

PARSERS = ("deepseek_r1", "qwen3")
OPEN, CLOSE = "<think>", "</think>"


def split(parser: str, text: str, final: bool) -> tuple[str, str, str]:
    """(reasoning, content, pending) of the text so far; pending may still turn out to be a marker."""
    if parser not in PARSERS:
        raise ValueError(f"unknown reasoning parser {parser!r}; choose one of {', '.join(PARSERS)}")
    body = text
    stripped = body.lstrip()
    if not final and stripped and OPEN.startswith(stripped) and stripped != OPEN:
        return "", "", text  # may be the opening marker, arriving in pieces
    if stripped.startswith(OPEN):
        body = stripped[len(OPEN):]
    elif parser == "qwen3":
        return "", text, ""  # no think block: it is all answer
    end = body.find(CLOSE)
    if end == -1:
        keep = 0 if final else partial_marker(body, CLOSE)
        return body[: len(body) - keep], "", body[len(body) - keep:]
    return body[:end], body[end + len(CLOSE):], ""


def parse(parser: str, text: str) -> tuple[str | None, str | None]:
    """Complete output -> (reasoning or None, content or None)."""
    reasoning, content, _ = split(parser, text, final=True)
    return reasoning.strip() or None, content.strip() or None


class StreamingReasoningParser:
    def __init__(self, parser: str):
        self.parser = parser
        self.text = ""
        self.sent = [0, 0]  # characters of reasoning and of content already sent

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        """Returns the (reasoning delta, content delta)."""
        self.text += delta
        reasoning, content, _ = split(self.parser, self.text, final)
        r, c = reasoning[self.sent[0]:], content[self.sent[1]:]
        self.sent = [max(self.sent[0], len(reasoning)), max(self.sent[1], len(content))]
        return r, c
