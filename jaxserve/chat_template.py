"""Conversation -> prompt text, through the model's chat template (or one given by the caller)."""

from __future__ import annotations


def render(tokenizer, messages: list[dict], *, chat_template: str | None = None, add_generation_prompt: bool = True,
           continue_final_message: bool = False, tools: list[dict] | None = None, documents: list[dict] | None = None,
           chat_template_kwargs: dict | None = None) -> str:
    if add_generation_prompt and continue_final_message:
        raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
    template = chat_template or tokenizer.chat_template
    if not template:
        raise ValueError("this model has no chat template; pass chat_template=... (a Jinja template)")
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tools=tools, documents=documents, tokenize=False,
        add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
        **(chat_template_kwargs or {}),
    )


def encode_prompt(tokenizer, text: str) -> list[int]:
    # The rendered template already carries BOS and role markers; adding special tokens would double BOS.
    return tokenizer.encode(text, add_special_tokens=False)
