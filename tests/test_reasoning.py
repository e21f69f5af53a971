"""Reasoning parsers on complete text and streamed split at every boundary."""

import pytest

from jaxserve.text.reasoning import ABSENT, CLOSED, OPENED, StreamingReasoningParser, parse, prompt_state

CASES = [
    ("qwen3", "<think>\nLet me think. 2+2=4\n</think>\n\nThe answer is 4.", "Let me think. 2+2=4", "The answer is 4."),
    ("qwen3", "The answer is 4.", None, "The answer is 4."),
    ("qwen3", "<think>cut off mid-thought", "cut off mid-thought", None),
    ("qwen3", "<think></think>Only the answer", None, "Only the answer"),
    ("deepseek_r1", "Reasoning first.</think>Answer.", "Reasoning first.", "Answer."),
    ("deepseek_r1", "<think>Reasoning.</think>\nAnswer.", "Reasoning.", "Answer."),
    ("deepseek_r1", "All reasoning, never closed", "All reasoning, never closed", None),
    ("deepseek_r1", "Uses < and </thin tags wrongly", "Uses < and </thin tags wrongly", None),
]


@pytest.mark.parametrize("parser,text,reasoning,content", CASES)
def test_complete_and_streamed(parser, text, reasoning, content):
    assert parse(parser, text) == (reasoning, content)
    for pieces in [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text) + [""]]:
        s = StreamingReasoningParser(parser)
        r, c = "", ""
        for i, piece in enumerate(pieces):
            dr, dc = s.feed(piece, final=i == len(pieces) - 1)
            r, c = r + dr, c + dc
            assert "</think>" not in r + c and "<think>" not in r + c
        assert (r.strip() or None, c.strip() or None) == (reasoning, content)


def test_unknown_parser():
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        parse("o1", "x")


@pytest.mark.parametrize("prompt,state", [
    ("<|im_start|>assistant\n<think>\n", OPENED),  # DeepSeek-R1's templates open the block
    ("<|im_start|>assistant\n<think>\n\n</think>\n\n", CLOSED),  # Qwen3 with enable_thinking false
    ("<|im_start|>assistant\n", ABSENT),  # Qwen3 thinking, instruct models
    ("<think>\nold</think>\n\nold answer<|im_end|>\n<|im_start|>assistant\n", ABSENT),  # history is not the state
    ("<|im_start|>assistant\n<think>\nhalf a thought", OPENED),  # continue_final_message inside a block
])
def test_prompt_state(prompt, state):
    assert prompt_state(prompt) == state


@pytest.mark.parametrize("parser", ["qwen3", "deepseek_r1"])
def test_the_prompt_state_decides_the_split(parser):
    text = "Reasoning.</think>Answer."
    assert parse(parser, text, OPENED) == ("Reasoning.", "Answer.")
    assert parse(parser, text, ABSENT) == (None, text)  # no block was opened: all of it is answer
    assert parse(parser, "<think>R.</think>A.", ABSENT) == ("R.", "A.")
    assert parse(parser, "<think>R.</think>A.", CLOSED) == (None, "<think>R.</think>A.")
