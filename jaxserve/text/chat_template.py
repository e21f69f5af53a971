"""Conversation -> prompt text through a Jinja chat template, rendered in a sandbox.

Templates come from the model (tokenizer files or GGUF metadata) or from the user, so they are untrusted: they
run in jinja2's immutable sandbox, which refuses attribute access to Python internals (`__class__`, `__mro__`,
...) and offers no way to read files. The variables and helpers are the ones transformers gives templates
(`messages`, `tools`, `documents`, `add_generation_prompt`, special tokens, `raise_exception`, `strftime_now`,
a `tojson` that does not HTML-escape), so a template renders here exactly as with `apply_chat_template`.

A template that reads tools from the system message instead of `tools` (Phi-4-mini's: `message['tools']`, a JSON
list of the functions) gets the request's tools there. A template that mentions tools in neither place still gets
them: a system-prompt block lists the tools as JSON and asks for calls as `<tool_call>{"name": ..., "arguments":
...}</tool_call>` (the Hermes format, which the `hermes` tool parser reads), and earlier assistant tool calls are
shown to the model in that same form.
"""

from __future__ import annotations

import copy
import datetime
import functools
import json

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

CONTENT_FORMATS = ("auto", "string", "openai")
_CONTINUE_MARK = "\x00jaxserve-continue\x00"

DEFAULT_TOOL_PROMPT = (
    "You can call the following tools. Each is described by a JSON schema:\n<tools>\n{tools}\n</tools>\n"
    "To call a tool, answer with one or more lines of the form\n"
    '<tool_call>{{"name": "<tool name>", "arguments": {{<arguments as JSON>}}}}</tool_call>\n'
    "and nothing else; otherwise answer normally."
)


class ChatTemplateError(ValueError):
    """The template could not be rendered (bad syntax, raise_exception, or a sandbox violation)."""


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


@functools.lru_cache(maxsize=32)
def _compile(template: str):
    env = _environment()
    try:
        ast = env.parse(template)
        return env.from_string(template), _Features.of(ast)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error at line {e.lineno}: {e.message}") from None


class _Features:
    """What a template does with its inputs, read from its syntax tree."""

    def __init__(self, variables: set[str], iterates_content: bool, mentions_developer: bool,
                 message_tools: bool):
        self.variables = variables
        self.iterates_content = iterates_content
        self.mentions_developer = mentions_developer
        self.message_tools = message_tools  # reads a message's "tools" (Phi-4-mini's system message)

    @classmethod
    def of(cls, ast) -> "_Features":
        def is_content(node):
            return ((isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Const)
                     and node.arg.value == "content")
                    or (isinstance(node, jinja2.nodes.Getattr) and node.attr == "content"))

        iterates = any(is_content(loop.iter) for loop in ast.find_all(jinja2.nodes.For))
        developer = any(c.value == "developer" for c in ast.find_all(jinja2.nodes.Const))
        message_tools = any(isinstance(n.arg, jinja2.nodes.Const) and n.arg.value == "tools"
                            for n in ast.find_all(jinja2.nodes.Getitem))
        return cls(jinja2.meta.find_undeclared_variables(ast), iterates, developer, message_tools)


def render(tokenizer, messages: list[dict], *, chat_template: str | None = None, add_generation_prompt: bool = True,
           continue_final_message: bool = False, tools: list[dict] | None = None, documents: list[dict] | None = None,
           chat_template_kwargs: dict | None = None, content_format: str = "auto") -> str:
    """messages: OpenAI-style dicts (content a string or a list of {"type": "text", "text"} parts)."""
    if add_generation_prompt and continue_final_message:
        raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
    if content_format not in CONTENT_FORMATS:
        raise ValueError(f"chat_template_content_format must be one of {', '.join(CONTENT_FORMATS)}")
    source = chat_template or tokenizer.chat_template
    if not source:
        raise ValueError("this model has no chat template; pass chat_template=... (a Jinja template)")
    template, features = _compile(source)
    as_parts = content_format == "openai" or (content_format == "auto" and features.iterates_content)
    msgs = [_prepare(m, as_parts, features) for m in messages]
    if tools and "tools" not in features.variables:
        msgs = _with_system_tools(msgs, tools) if features.message_tools else _with_tool_prompt(msgs, tools, as_parts)
    if continue_final_message:
        if not msgs or msgs[-1]["role"] != "assistant":
            raise ValueError("continue_final_message needs the conversation to end with an assistant message")
        msgs[-1] = _mark_end(msgs[-1])
    specials = {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    try:
        text = template.render(messages=msgs, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt,
                               **{k: v for k, v in specials.items() if isinstance(v, str)},
                               **(chat_template_kwargs or {}))
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"chat template blocked by the sandbox: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template error: {e}") from None
    except Exception as e:  # a template is user code: any failure inside it is the template's
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
    if continue_final_message:
        # Everything the template adds after the final message (end-of-turn tokens) is cut off.
        text = text[: text.rindex(_CONTINUE_MARK)] if _CONTINUE_MARK in text else text
    return text


def _prepare(message: dict, as_parts: bool, features: _Features) -> dict:
    m = copy.deepcopy(message)  # the caller's messages stay as they were
    if m.get("role") == "developer" and not features.mentions_developer:
        m["role"] = "system"  # OpenAI's newer name for the system role, unknown to most templates
    content = m.get("content")
    if as_parts and isinstance(content, str):
        m["content"] = [{"type": "text", "text": content}]
    elif not as_parts and isinstance(content, list):
        m["content"] = "".join(p.get("text", "") for p in content)
    elif content is None and not as_parts:
        m["content"] = ""
    for call in m.get("tool_calls") or []:
        fn = call.get("function", {})
        # transformers' convention: templates get arguments as a dict, not the JSON string OpenAI sends.
        if isinstance(fn.get("arguments"), str):
            try:
                fn["arguments"] = json.loads(fn["arguments"])
            except json.JSONDecodeError:
                pass
    return m


def _with_system_tools(msgs: list[dict], tools: list[dict]) -> list[dict]:
    """The functions as a JSON list on the system message (one with no text added where there is none), unless the
    conversation put its own there."""
    listing = json.dumps([t.get("function", t) for t in tools], ensure_ascii=False)
    if msgs and msgs[0].get("role") == "system":
        return [{"tools": listing, **msgs[0]}] + msgs[1:]
    return [{"role": "system", "content": "", "tools": listing}] + msgs


def _with_tool_prompt(msgs: list[dict], tools: list[dict], as_parts: bool) -> list[dict]:
    listing = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    block = DEFAULT_TOOL_PROMPT.format(tools=listing)
    out = []
    for m in msgs:
        if m.get("tool_calls"):  # show the model its earlier calls in the format it is asked to use
            calls = "\n".join("<tool_call>" + json.dumps({"name": c["function"]["name"],
                                                           "arguments": c["function"].get("arguments", {})},
                                                          ensure_ascii=False) + "</tool_call>"
                              for c in m["tool_calls"])
            m = {**m, "content": _append_text(m.get("content"), calls)}
        out.append(m)
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": _append_text(out[0]["content"], "\n\n" + block)}
    else:
        out.insert(0, {"role": "system", "content": [{"type": "text", "text": block}] if as_parts else block})
    return out


def _append_text(content, text: str):
    if isinstance(content, list):
        return [*content, {"type": "text", "text": text}]
    return (content or "") + text


def _mark_end(message: dict) -> dict:
    return {**message, "content": _append_text(message.get("content"), _CONTINUE_MARK)}


def encode_prompt(tokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    # The rendered template already carries BOS and role markers; adding special tokens would double BOS.
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)
