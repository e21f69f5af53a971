"""Chat templates: our sandboxed renderer equals transformers' apply_chat_template, and the sandbox holds."""

import json
import pathlib

import pytest

import tiny
from jaxserve.text.chat_template import ChatTemplateError, render
from jaxserve.text.tool_parsers import parse, parser_for_template

TEMPLATES = pathlib.Path(__file__).parent / "templates"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city"]}}}
CALL_ARGS = {"city": "Paris", "unit": "c"}


def _conversations(tool_calls_as_string: bool):
    args = json.dumps(CALL_ARGS) if tool_calls_as_string else CALL_ARGS
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": args}}
    return {
        "plain": ([{"role": "user", "content": "Hello there"}], None),
        "system": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], None),
        "multi_turn": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello! How can I help?"},
                        {"role": "user", "content": "  Name a colour.\n"}], None),
        "tools": ([{"role": "user", "content": "Weather in Paris?"}], [WEATHER]),
        "tool_round_trip": ([
            {"role": "system", "content": "You help with weather."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        ], [WEATHER]),
    }


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.make_tokenizer(300)


# Each template with the cases it supports: Gemma 3 and Phi-4-mini take no `tools` (jaxserve then adds its own tool
# prompt, which transformers does not; Phi-4-mini's tools ride on the system message, tested below).
ALL_CASES = ["plain", "system", "multi_turn", "tools", "tool_round_trip"]
SUPPORTED = {"qwen2_5.jinja": ALL_CASES, "llama3_1.jinja": ALL_CASES, "qwen3_coder.jinja": ALL_CASES,
             "gemma3.jinja": ["plain", "system", "multi_turn"], "phi4_mini.jinja": ["plain", "system", "multi_turn"]}


@pytest.mark.parametrize("template,case", [(t, c) for t, cases in SUPPORTED.items() for c in cases])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_rendering_equals_transformers(tokenizer, template, case, generation_prompt):
    source = (TEMPLATES / template).read_text()
    ours_msgs, tools = _conversations(tool_calls_as_string=True)[case]  # OpenAI clients send JSON strings
    ref_msgs, _ = _conversations(tool_calls_as_string=False)[case]  # transformers wants dicts
    ours = render(tokenizer, ours_msgs, chat_template=source, tools=tools, add_generation_prompt=generation_prompt)
    ref = tokenizer.apply_chat_template(ref_msgs, chat_template=source, tools=tools, tokenize=False,
                                        add_generation_prompt=generation_prompt)
    assert ours == ref
    if tools:
        assert "get_weather" in ours


def test_gemma3_folds_the_system_prompt_into_the_first_user_turn(tokenizer):
    msgs, _ = _conversations(tool_calls_as_string=True)["multi_turn"]
    text = render(tokenizer, msgs, chat_template=(TEMPLATES / "gemma3.jinja").read_text())
    assert text == (f"{tokenizer.bos_token}<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                    "<start_of_turn>model\nHello! How can I help?<end_of_turn>\n"
                    "<start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n")


def test_phi4_mini_tools_on_the_system_message_equal_transformers(tokenizer):
    source = (TEMPLATES / "phi4_mini.jinja").read_text()
    tools = json.dumps([WEATHER["function"]])
    msgs = [{"role": "system", "content": "You are a helpful assistant with some tools.", "tools": tools},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": 'functools[{"name": "get_weather", "arguments": {"city": "Paris"}}]'},
            {"role": "tool", "content": '{"temp": 21}'}]
    ours = render(tokenizer, msgs, chat_template=source)
    assert ours == tokenizer.apply_chat_template(msgs, chat_template=source, tokenize=False, add_generation_prompt=True)
    assert ours.startswith(f"<|system|>You are a helpful assistant with some tools.<|tool|>{tools}<|/tool|><|end|>")
    assert ours.endswith('<|tool|>{"temp": 21}<|end|><|assistant|>')


def test_phi4_mini_gets_the_requests_tools_on_its_system_message(tokenizer):
    """The OpenAI request's `tools` reach Phi-4-mini's template where it reads them (the system message's `tools`,
    a JSON list of the functions), with no system message of the request's own too; its parser is guessed."""
    source = (TEMPLATES / "phi4_mini.jinja").read_text()
    listing = json.dumps([WEATHER["function"]])
    user = {"role": "user", "content": "Weather in Paris?"}
    system = {"role": "system", "content": "Be brief."}
    assert render(tokenizer, [system, user], chat_template=source, tools=[WEATHER]) == (
        f"<|system|>Be brief.<|tool|>{listing}<|/tool|><|end|><|user|>Weather in Paris?<|end|><|assistant|>")
    assert render(tokenizer, [user], chat_template=source, tools=[WEATHER]) == (
        f"<|system|><|tool|>{listing}<|/tool|><|end|><|user|>Weather in Paris?<|end|><|assistant|>")
    assert parser_for_template(source) == "phi4_mini_json"


def test_qwen3_coder_renders_earlier_calls_as_the_qwen3_xml_parser_reads_them(tokenizer):
    msgs, tools = _conversations(tool_calls_as_string=True)["tool_round_trip"]
    text = render(tokenizer, msgs, chat_template=(TEMPLATES / "qwen3_coder.jinja").read_text(), tools=tools)
    call = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
            "<parameter=unit>\nc\n</parameter>\n</function>\n</tool_call>")
    assert f"<|im_start|>assistant\n{call}<|im_end|>" in text
    content, calls = parse("qwen3_xml", call, schemas={"get_weather": WEATHER["function"]["parameters"]})
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", CALL_ARGS)]
    assert parser_for_template((TEMPLATES / "qwen3_coder.jinja").read_text()) == "qwen3_xml"


def test_continue_final_message_equals_transformers(tokenizer):
    source = (TEMPLATES / "qwen2_5.jinja").read_text()
    msgs = [{"role": "user", "content": "Count to three"}, {"role": "assistant", "content": "One, two,"}]
    ours = render(tokenizer, msgs, chat_template=source, add_generation_prompt=False, continue_final_message=True)
    ref = tokenizer.apply_chat_template(msgs, chat_template=source, tokenize=False, continue_final_message=True)
    assert ours == ref and ours.endswith("One, two,")


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
])
def test_sandbox_blocks_python_internals(tokenizer, template):
    with pytest.raises(ChatTemplateError, match="sandbox|unsafe|attribute"):
        render(tokenizer, [{"role": "user", "content": "x"}], chat_template=template)


@pytest.mark.parametrize("template", ["{% include '/etc/passwd' %}", "{{ open('/etc/passwd').read() }}",
                                      "{% import 'os' as os %}{{ os.listdir('/') }}"])
def test_templates_cannot_read_files(tokenizer, template):
    with pytest.raises(ChatTemplateError):
        render(tokenizer, [{"role": "user", "content": "x"}], chat_template=template)


def test_syntax_errors_and_raise_exception_are_clear(tokenizer):
    with pytest.raises(ChatTemplateError, match="syntax error"):
        render(tokenizer, [{"role": "user", "content": "x"}], chat_template="{% for %}")
    with pytest.raises(ChatTemplateError, match="only user roles"):
        render(tokenizer, [{"role": "user", "content": "x"}],
               chat_template="{{ raise_exception('only user roles') }}")


def test_content_format_auto_detects_part_iteration(tokenizer):
    parts_template = ("{% for m in messages %}{% for p in m['content'] %}[{{ p['type'] }}:{{ p['text'] }}]"
                      "{% endfor %}{% endfor %}")
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": "b"}]}]
    assert render(tokenizer, msgs, chat_template=parts_template, add_generation_prompt=False) == "[text:a][text:b]"
    string_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    assert render(tokenizer, msgs, chat_template=string_template, add_generation_prompt=False) == "<a><b>"
    with pytest.raises(ValueError, match="content_format"):
        render(tokenizer, msgs, chat_template=string_template, content_format="xml")


def test_developer_becomes_system_where_the_template_has_no_developer(tokenizer):
    msgs = [{"role": "developer", "content": "Rules"}, {"role": "user", "content": "Hi"}]
    assert "<|im_start|>system\nRules" in render(tokenizer, msgs, chat_template=tiny.CHATML)
    knows = "{% for m in messages %}{% if m.role == 'developer' %}DEV:{% endif %}{{ m.content }}{% endfor %}"
    assert render(tokenizer, msgs, chat_template=knows) == "DEV:RulesHi"


def test_templates_without_tool_support_get_a_tool_prompt(tokenizer):
    msgs, tools = _conversations(tool_calls_as_string=True)["tool_round_trip"]
    text = render(tokenizer, msgs, chat_template=tiny.CHATML, tools=tools)
    assert text.startswith("<|im_start|>system\nYou help with weather.\n\nYou can call the following tools")
    assert json.dumps(WEATHER["function"]) in text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}</tool_call>' in text
    assert msgs[2]["tool_calls"][0]["function"]["arguments"] == json.dumps(CALL_ARGS)  # the caller's data untouched


def test_chat_template_kwargs_reach_the_template(tokenizer):
    template = "{% if enable_thinking %}<think>{% endif %}{{ messages[0].content }}"
    msgs = [{"role": "user", "content": "x"}]
    assert render(tokenizer, msgs, chat_template=template, chat_template_kwargs={"enable_thinking": True}) == "<think>x"
    assert render(tokenizer, msgs, chat_template=template) == "x"
