"""vLLM's request fields over HTTP on a tiny model: prompt logprobs, echo with logprobs, token ids in and out,
cache salts, bad words, priorities, /tokenize strings, and what OpenAI and vLLM refuse."""

import json

import httpx
import pytest

import tiny
from serving import Server

MESSAGES = [{"role": "user", "content": "Hello there"}]
LONG = "The quick brown fox jumps over the lazy dog. " * 6  # several pages of 16 tokens


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tiny.make_checkpoint(tmp_path_factory.mktemp("fields"), "llama")
    s = Server(str(folder), "--max-model-len", "512", "--max-num-seqs", "4", "--max-num-batched-tokens", "64",
               "--served-model-name", "tiny", "--scheduling-policy", "priority",
               log_path=tmp_path_factory.mktemp("logs") / "server.log").wait_ready()
    yield s
    assert s.stop() == 0


def _post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=60)


def _ok(server, path, body) -> dict:
    r = _post(server, path, body)
    assert r.status_code == 200, r.text
    return r.json()


def _events(server, path, body) -> list[dict]:
    with httpx.stream("POST", server.url + path, json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


GREEDY = {"temperature": 0, "ignore_eos": True}


def test_prompt_logprobs_have_vllms_shape(server):
    ids = _ok(server, "/tokenize", {"prompt": "The quick brown fox"})["tokens"]
    r = _ok(server, "/v1/completions", {"prompt": ids, "max_tokens": 2, "prompt_logprobs": 2, **GREEDY})
    (choice,) = r["choices"]
    plp = choice["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for token, entry in zip(ids[1:], plp[1:]):
        assert list(entry)[0] == str(token)  # the prompt's own token first, then the top 2
        assert all(set(v) == {"logprob", "rank", "decoded_token"} and v["logprob"] <= 0 for v in entry.values())
        assert sorted(v["rank"] for k, v in entry.items() if k != str(token))[:2] == [1, 2]
    chat = _ok(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "prompt_logprobs": 0, **GREEDY})
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    assert "prompt_logprobs" not in _ok(server, "/v1/completions", {"prompt": ids, "max_tokens": 1})["choices"][0]
    refused = _post(server, "/v1/completions", {"prompt": ids, "max_tokens": 1, "prompt_logprobs": -1})
    assert refused.status_code == 400 and "greater than max allowed" in refused.json()["error"]["message"]
    refused = _post(server, "/v1/completions", {"prompt": ids, "prompt_logprobs": 1, "stream": True})
    assert refused.status_code == 400 and "streaming" in refused.json()["error"]["message"]


def test_echo_with_logprobs_covers_the_prompt(server):
    ids = _ok(server, "/tokenize", {"prompt": "jax serve models"})["tokens"]
    body = {"prompt": ids, "max_tokens": 3, "logprobs": 1, "echo": True, **GREEDY}
    (choice,) = _ok(server, "/v1/completions", body)["choices"]
    lp = choice["logprobs"]
    plain = _ok(server, "/v1/completions", {**body, "echo": False, "prompt_logprobs": 1})["choices"][0]
    assert len(lp["tokens"]) == len(ids) + 3 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:len(ids)] == [e[str(t)]["logprob"] for t, e in zip(ids[1:], plain["prompt_logprobs"][1:])]
    assert lp["tokens"][len(ids):] == plain["logprobs"]["tokens"] and choice["text"].endswith(plain["text"])
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][len(ids)] == len(choice["text"]) - len(
        plain["text"])
    as_ids = _ok(server, "/v1/completions", {**body, "return_tokens_as_token_ids": True})["choices"][0]["logprobs"]
    assert as_ids["text_offset"] == lp["text_offset"]  # offsets count the text, whatever names the tokens
    assert as_ids["tokens"][0] == f"token_id:{ids[0]}"
    chunks = _events(server, "/v1/completions", {**body, "stream": True})
    first = chunks[0]["choices"][0]
    assert first["text"] == choice["text"][: len(choice["text"]) - len(plain["text"])]
    assert first["logprobs"]["tokens"] == lp["tokens"][: len(ids)]
    assert [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]] == lp["tokens"]


def test_token_ids_in_and_out(server):
    body = {"messages": MESSAGES, "max_tokens": 6, "temperature": 1.0, "seed": 4, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 2, "return_token_ids": True, "return_tokens_as_token_ids": True}
    r = _ok(server, "/v1/chat/completions", body)
    assert r["prompt_token_ids"] == _ok(server, "/tokenize", {"messages": MESSAGES})["tokens"]
    (choice,) = r["choices"]
    assert len(choice["token_ids"]) == r["usage"]["completion_tokens"] == 6
    names = [item["token"] for item in choice["logprobs"]["content"]]
    assert names == [f"token_id:{t}" for t in choice["token_ids"]]
    assert all(top["token"].startswith("token_id:") for item in choice["logprobs"]["content"]
               for top in item["top_logprobs"])
    chunks = _events(server, "/v1/chat/completions", {**body, "stream": True})
    assert chunks[0]["prompt_token_ids"] == r["prompt_token_ids"]
    assert [t for c in chunks for ch in c["choices"] for t in ch.get("token_ids") or []] == choice["token_ids"]
    assert "prompt_token_ids" not in _ok(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1})
    c = _ok(server, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 3, "return_token_ids": True, **GREEDY})
    assert c["choices"][0]["prompt_token_ids"] == [5, 6, 7] and len(c["choices"][0]["token_ids"]) == 3


def test_cache_salt_separates_prefix_caches(server):
    def cached(**extra):
        r = _ok(server, "/v1/completions", {"prompt": LONG, "max_tokens": 1, **extra})
        return r["usage"]["prompt_tokens_details"]["cached_tokens"]

    cached(cache_salt="tenant-a")
    assert cached(cache_salt="tenant-a") > 0  # the same salt shares
    assert cached(cache_salt="tenant-b") == 0 and cached() == 0  # another salt, or none, shares nothing with it
    assert _post(server, "/v1/completions", {"prompt": LONG, "cache_salt": ""}).status_code == 400


def test_bad_words_are_never_produced(server):
    body = {"prompt": "Hello world!", "max_tokens": 12, "return_token_ids": True, **GREEDY}
    free = _ok(server, "/v1/completions", body)["choices"][0]["token_ids"]

    def text(t):
        return _ok(server, "/detokenize", {"tokens": [t]})["prompt"]

    # A generated token that is a word on its own (spelled by that one token), banned by its text.
    token = next(t for t in free if text(t).strip().isalpha() and text(t).isascii()
                 and _ok(server, "/tokenize", {"prompt": text(t), "add_special_tokens": False})["tokens"] == [t])
    banned = _ok(server, "/v1/completions", {**body, "bad_words": [text(token).strip()]})["choices"][0]["token_ids"]
    assert token not in banned and banned[:free.index(token)] == free[:free.index(token)]


def test_priority_needs_the_policy_and_is_accepted_with_it(server, tmp_path):
    r = _ok(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "priority": -5})
    assert r["choices"][0]["finish_reason"] in ("stop", "length")
    folder = tiny.make_checkpoint(tmp_path / "fcfs", "llama")
    fcfs = Server(str(folder), "--max-model-len", "256", log_path=tmp_path / "fcfs.log").wait_ready()
    try:
        r = httpx.post(fcfs.url + "/v1/chat/completions", json={"messages": MESSAGES, "priority": 1}, timeout=60)
        assert r.status_code == 400 and "--scheduling-policy priority" in r.json()["error"]["message"]
    finally:
        assert fcfs.stop() == 0


def test_tokenize_returns_token_strings(server):
    r = _ok(server, "/tokenize", {"prompt": "Hello world", "return_token_strs": True})
    assert len(r["token_strs"]) == r["count"] and "".join(r["token_strs"]).replace("Ġ", " ") == "Hello world"
    assert _ok(server, "/tokenize", {"prompt": "Hello world"})["token_strs"] is None


@pytest.mark.parametrize("body,needle", [
    ({"stream_options": {"include_usage": True}}, "stream_options can only be set when stream is true"),
    ({"seed": 2**63}, "seed"),
    ({"seed": -2**63 - 1}, "seed"),
    ({"temperature": 5}, "temperature: Input should be less than or equal to 2 (got 5)"),
])
def test_refused_like_openai_and_vllm(server, body, needle):
    r = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1, **body})
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_int64_seeds_and_usage_options(server):
    assert _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1, "seed": -2**63}).status_code == 200
    body = {"messages": MESSAGES, "max_tokens": 3, "stream": True, **GREEDY}
    quiet = _events(server, "/v1/chat/completions", {**body, "stream_options": {
        "include_usage": False, "continuous_usage_stats": True}})
    assert all(c.get("usage") is None for c in quiet)  # continuous stats only come with include_usage
    loud = _events(server, "/v1/chat/completions", {**body, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}})
    assert all(c["usage"] is not None for c in loud) and loud[-1]["choices"] == []


def test_malformed_json_has_no_param(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"messages": [', timeout=30,
                   headers={"Content-Type": "application/json"})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] is None and err["message"].startswith("the request body is not valid JSON")


def test_tool_choice_none_keeps_the_tools_in_the_prompt(server):
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}}}}

    def prompt_tokens(**extra):
        return _ok(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1, **extra})["usage"][
            "prompt_tokens"]

    with_tools = prompt_tokens(tools=[tool], tool_choice="auto")
    assert prompt_tokens(tools=[tool], tool_choice="none") == with_tools > prompt_tokens()


def test_the_models_sampling_defaults_fill_what_a_request_leaves_out():
    from server.protocol import ChatCompletionRequest

    defaults = {"temperature": 0.2, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1}
    given = ChatCompletionRequest(messages=MESSAGES, temperature=0.7).sampling_params(100, defaults)
    assert (given.temperature, given.top_p, given.top_k, given.repetition_penalty, given.min_p) == (
        0.7, 0.9, 40, 1.1, 0.0)  # the request's own value wins; min_p keeps the API default
    plain = ChatCompletionRequest(messages=MESSAGES).sampling_params(100, {})  # --generation-config vllm
    assert (plain.temperature, plain.top_p, plain.top_k) == (1.0, 1.0, 0)


def test_add_special_tokens_reaches_the_tokenizer():
    """Chat prompts default to no special tokens (the template has them); completions to adding them."""
    import types

    from tokenizers import processors

    from server import chat, completions
    from server.protocol import ChatCompletionRequest, CompletionRequest

    tok = tiny.make_tokenizer(300)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", tok.bos_token_id)])
    state = types.SimpleNamespace(tokenizer=tok, chat_template=None,
                                  config=types.SimpleNamespace(chat_template_content_format="auto"))
    bos = tok.bos_token_id
    _, ids = chat.render_prompt(state, ChatCompletionRequest(messages=MESSAGES))
    _, with_bos = chat.render_prompt(state, ChatCompletionRequest(messages=MESSAGES, add_special_tokens=True))
    assert with_bos == [bos] + ids and ids[0] == bos  # CHATML opens with <|im_start|> itself
    assert completions.encode_prompts(tok, CompletionRequest(prompt="hello"))[0][0] == bos
    assert completions.encode_prompts(tok, CompletionRequest(prompt="hello", add_special_tokens=False))[0] == \
        tok.encode("hello", add_special_tokens=False)
