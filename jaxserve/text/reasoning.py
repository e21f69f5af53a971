"""Reasoning parsers: split `<think>...</think>` from the answer, complete or streamed.

Where the output starts is read from the rendered prompt (`prompt_state`), never assumed from the parser's name:
- OPENED: the template opened a think block (DeepSeek-R1's `<think>\n`): the output is reasoning up to `</think>`.
- CLOSED: the template closed one (Qwen3 with enable_thinking false): the output is all answer.
- ABSENT: neither (Qwen3 thinking, instruct models such as SmolLM2): reasoning only if the output itself begins
  with `<think>`.
Constrained decoding reads the same state (structured_output), so the constraint and the split always agree.
Both parsers, `deepseek_r1` and `qwen3`, use these markers; with no prompt to read, `deepseek_r1` assumes
OPENED and `qwen3` ABSENT.
"""

from __future__ import annotations

from jaxserve.text.tool_parsers import partial_marker

PARSERS = ("deepseek_r1", "qwen3")
OPEN, CLOSE = "<think>", "</think>"
OPENED, CLOSED, ABSENT = "opened", "closed", "absent"
STATES = (OPENED, CLOSED, ABSENT)


def prompt_state(prompt: str) -> str:
    """Where a rendered prompt leaves the output: inside a think block (the last marker opens one), after one
    (the prompt ends with a closing marker), or before any (earlier turns' closed blocks are history)."""
    opened, closed = prompt.rfind(OPEN), prompt.rfind(CLOSE)
    if opened > closed:
        return OPENED
    if closed != -1 and not prompt[closed + len(CLOSE):].strip():
        return CLOSED
    return ABSENT


def default_state(parser: str) -> str:
    if parser not in PARSERS:
        raise ValueError(f"unknown reasoning parser {parser!r}; choose one of {', '.join(PARSERS)}")
    return OPENED if parser == "deepseek_r1" else ABSENT


def split(parser: str, text: str, final: bool, state: str | None = None) -> tuple[str, str, str]:
    """(reasoning, content, pending) of the text so far; pending may still turn out to be a marker."""
    default = default_state(parser)  # checks the name
    state = state or default
    if state == CLOSED:
        return "", text, ""
    body = text
    stripped = body.lstrip()
    if not final and stripped and OPEN.startswith(stripped) and stripped != OPEN:
        return "", "", text  # may be the opening marker, arriving in pieces
    if stripped.startswith(OPEN):
        body = stripped[len(OPEN):]  # tolerated after OPENED too
    elif state == ABSENT:
        return "", text, ""  # no think block: it is all answer
    end = body.find(CLOSE)
    if end == -1:
        keep = 0 if final else partial_marker(body, CLOSE)
        return body[: len(body) - keep], "", body[len(body) - keep:]
    return body[:end], body[end + len(CLOSE):], ""


def parse(parser: str, text: str, state: str | None = None) -> tuple[str | None, str | None]:
    """Complete output -> (reasoning or None, content or None)."""
    reasoning, content, _ = split(parser, text, True, state)
    return reasoning.strip() or None, content.strip() or None


class StreamingReasoningParser:
    def __init__(self, parser: str, state: str | None = None):
        self.parser = parser
        self.state = state
        self.text = ""
        self.sent = [0, 0]  # characters of reasoning and of content already sent

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        """Returns the (reasoning delta, content delta)."""
        self.text += delta
        reasoning, content, _ = split(self.parser, self.text, final, self.state)
        # Stripped as `parse` strips: whitespace at either end waits until text follows it (or is dropped), so
        # the deltas add up to exactly the complete message.
        reasoning, content = reasoning.strip(), content.strip()
        r, c = reasoning[self.sent[0]:], content[self.sent[1]:]
        self.sent = [max(self.sent[0], len(reasoning)), max(self.sent[1], len(content))]
        return r, c
