"""The offline API on a tiny random model: continuous batching, chunked prefill, preemption, stops, seeds, chat."""

import dataclasses
import json
import re

import numpy as np
import pytest

import tiny
from jaxserve import LLM, SamplingParams
from jaxserve.sampling_params import RequestOutputKind
from jaxserve.engine import InvalidRequest
from jaxserve.text.structured_output import StructuredOutput
from paged import run_logits

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.make_checkpoint(tmp_path_factory.mktemp("llm"), "llama")


@pytest.fixture(scope="module")
def llm(folder):
    # A token budget of 32 forces prompts over 32 tokens into several prefill chunks.
    return LLM(str(folder), max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=32, page_size=8,
               compile_cache_dir="", progress=False)


def _prompts(llm, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, llm.engine.model.cfg.vocab_size, n).tolist() for n in lengths]


def test_batched_greedy_equals_each_sequence_alone(llm):
    prompts = _prompts(llm, [5, 40, 17, 70, 3, 33, 9, 12, 50, 21])  # more prompts than max_num_seqs
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        _, alone = run_logits(llm.engine.model, [prompt], decode_steps=11)
        assert out.outputs[0].token_ids == alone[0].tolist()
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].finish_reason == "length"
    assert llm.engine.block_manager.num_free == llm.engine.block_manager.num_pages


def test_preemption_keeps_greedy_output(folder, llm):
    prompts = _prompts(llm, [30, 25, 28, 31], seed=3)
    params = SamplingParams(max_tokens=40, **GREEDY)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    # 9 pages of 8 tokens hold just over one 70-token sequence: the scheduler must preempt and recompute.
    small = LLM(str(folder), max_model_len=72, max_num_seqs=4, max_num_batched_tokens=32, page_size=8,
                num_kv_pages=9, compile_cache_dir="", progress=False)
    got = [o.outputs[0].token_ids for o in small.generate(prompts, params, use_tqdm=False)]
    assert small.engine.scheduler.num_preemptions > 0
    assert got == expected
    assert small.engine.block_manager.num_free == small.engine.block_manager.num_pages


def test_stop_string_is_cut_from_text(llm):
    prompt = _prompts(llm, [10], seed=5)[0]
    full = llm.generate([prompt], SamplingParams(max_tokens=30, **GREEDY), use_tqdm=False)[0].outputs[0]
    text = full.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    out = llm.generate([prompt], SamplingParams(max_tokens=30, stop=[stop], **GREEDY), use_tqdm=False)[0].outputs[0]
    assert out.text == text[: text.index(stop)]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    kept = llm.generate([prompt], SamplingParams(max_tokens=30, stop=stop, include_stop_str_in_output=True,
                                                 **GREEDY), use_tqdm=False)[0].outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]


def test_streamed_logprobs_travel_with_their_text(llm):
    """Each output's new tokens are exactly those whose text it carries: their pieces join to its delta text, also
    when a stop string holds text back, when characters are split across byte tokens, and at the cut."""
    engine = llm.engine
    prompt = _prompts(llm, [10], seed=11)[0]
    sampled = SamplingParams(max_tokens=40, temperature=1.0, seed=3, logprobs=2, ignore_eos=True)
    text = llm.generate([prompt], sampled, use_tqdm=False)[0].outputs[0].text
    stop = text[len(text) // 2: len(text) // 2 + 4]
    for k, params in enumerate([sampled, dataclasses.replace(sampled, stop=["\u00e9\u00e9\u00e9 never"]),
                                dataclasses.replace(sampled, stop=[stop])]):
        engine.add_request(f"lp{k}", prompt, dataclasses.replace(params, output_kind=RequestOutputKind.DELTA))
        engine.add_request(f"lp{k}-all", prompt, params)  # CUMULATIVE: each output holds everything so far
        chunks, tokens, split_char, whole = [], [], False, None
        while engine.has_unfinished():
            for out in engine.step():
                o = out.outputs[0]
                if out.request_id.endswith("-all"):
                    whole = o
                    continue
                pieces = [next(iter(e.values())).decoded_token for e in o.logprobs]
                assert "".join(pieces) == o.text
                assert [next(iter(e)) for e in o.logprobs] == o.token_ids
                chunks.append(o.text)
                tokens += o.token_ids
                split_char |= any("\ufffd" in engine.token_text(t) for t in o.token_ids)
                final = o
        assert final.finish_reason is not None
        o = whole
        assert "".join(chunks) == o.text and tokens == o.token_ids and o.finish_reason == final.finish_reason
        assert "".join(next(iter(e.values())).decoded_token for e in o.logprobs) == o.text
        if k == 2:
            assert o.text == text[: text.index(stop)] and o.stop_reason == stop
    assert split_char  # the random model did emit byte tokens that are only part of a character


@pytest.mark.parametrize("budget", [0, 7])
def test_thinking_budget_is_exact(llm, budget):
    """A prompt that opened a think block: exactly `budget` tokens of thought, then "</think>" (forced through
    the sampler's masks), then the answer; with a constraint, the answer follows it."""
    close = list(llm.engine.grammars.close_ids)
    prompt = _prompts(llm, [8], seed=13)[0]
    free = SamplingParams(max_tokens=budget + len(close) + 6, temperature=1.0, seed=1, ignore_eos=True,
                          reasoning="opened", thinking_token_budget=budget)
    out = llm.generate([prompt], free, use_tqdm=False)[0].outputs[0]
    assert out.token_ids[budget:budget + len(close)] == close and len(out.token_ids) == free.max_tokens
    assert "</think>" not in llm.tokenizer.decode(out.token_ids[:budget + len(close) - 1])
    city = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
            "additionalProperties": False}
    constrained = dataclasses.replace(free, max_tokens=64, ignore_eos=False,
                                      structured_output=StructuredOutput.from_schema(city))
    out = llm.generate([prompt], constrained, use_tqdm=False)[0].outputs[0]
    assert out.token_ids[budget:budget + len(close)] == close and out.finish_reason == "stop"
    assert json.loads(out.text.split("</think>", 1)[1]) in ({"city": "Paris"}, {"city": "Rome"})


def test_priority_policy_admits_lower_values_first(folder):
    """One slot, three waiting requests: by priority (lower first), then arrival; fcfs keeps arrival order."""
    for policy, expected in [("priority", ["b", "d", "c", "a"]), ("fcfs", ["a", "b", "c", "d"])]:
        one = LLM(str(folder), max_model_len=64, max_num_seqs=1, max_num_batched_tokens=16, page_size=8,
                  compile_cache_dir="", progress=False, warm_up=False, scheduling_policy=policy)
        for name, rank in [("a", 2), ("b", 0), ("c", 1), ("d", 0)]:
            one.engine.add_request(name, [3, 4, 5], SamplingParams(max_tokens=2, **GREEDY), priority=rank)
        done = []
        while one.engine.has_unfinished():
            done += [o.request_id for o in one.engine.step() if o.finished]
        assert done == expected


def test_bad_words_ban_every_spelling(llm):
    from jaxserve.text.bad_words import token_sequences

    prompt = _prompts(llm, [8], seed=21)[0]
    free = llm.generate([prompt], SamplingParams(max_tokens=16, **GREEDY), use_tqdm=False)[0].outputs[0].token_ids
    word = llm.tokenizer.decode(free[2:4]).strip()
    sequences = token_sequences(llm.tokenizer, [word])
    assert len(sequences) == 2 and all(sequences)  # at the start of the text and after a space
    out = llm.generate([prompt], SamplingParams(max_tokens=16, bad_words=[word], **GREEDY),
                       use_tqdm=False)[0].outputs[0].token_ids
    assert out != free
    for seq in sequences:
        assert not any(tuple(out[i:i + len(seq)]) == seq for i in range(len(out)))


def test_generation_config_gives_the_defaults(tmp_path):
    """A folder's generation_config.json sampling values become the defaults of calls that give none."""
    folder = tiny.make_checkpoint(tmp_path, "llama")
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "top_k": 7, "do_sample": False}))
    model = LLM(str(folder), max_model_len=64, compile_cache_dir="", progress=False, warm_up=False)
    assert model.engine.model.generation_config == {"temperature": 0.0, "top_k": 7}
    defaults = model.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_k, defaults.top_p) == (0.0, 7, 1.0)


def test_stop_token_ids_and_eos(llm):
    prompt = _prompts(llm, [8], seed=6)[0]
    tokens = llm.generate([prompt], SamplingParams(max_tokens=20, **GREEDY), use_tqdm=False)[0].outputs[0].token_ids
    target = tokens[4]
    first = tokens.index(target)
    out = llm.generate([prompt], SamplingParams(max_tokens=20, stop_token_ids=[target], **GREEDY),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == tokens[: first + 1] and out.stop_reason == target and out.finish_reason == "stop"
    engine = llm.engine.core
    saved = engine.eos_token_ids
    engine.eos_token_ids = {target}
    try:
        eos = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0), use_tqdm=False)[0].outputs[0]
        ignored = llm.generate([prompt], SamplingParams(max_tokens=20, **GREEDY), use_tqdm=False)[0].outputs[0]
    finally:
        engine.eos_token_ids = saved
    assert eos.token_ids == tokens[: first + 1] and eos.finish_reason == "stop" and eos.stop_reason is None
    assert eos.text == llm.tokenizer.decode(tokens[:first], skip_special_tokens=True)
    assert ignored.token_ids == tokens and ignored.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_independent_of_batch(llm):
    prompts = _prompts(llm, [6, 11, 25], seed=7)
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=15, ignore_eos=True)
    alone = llm.generate([prompts[0]], p, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=0.7, seed=99, max_tokens=15, ignore_eos=True)
    batched = llm.generate(prompts, [p, others, others], use_tqdm=False)[0].outputs[0].token_ids
    assert alone == batched
    other_seed = llm.generate([prompts[0]], SamplingParams(temperature=1.0, seed=4321, max_tokens=15, ignore_eos=True),
                              use_tqdm=False)[0].outputs[0].token_ids
    assert other_seed != alone


def test_n_samples(llm):
    out = llm.generate("The quick brown fox", SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=10,
                                                            ignore_eos=True), use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) == 3
    assert all(len(o.token_ids) == 10 for o in out.outputs)


def test_chat_prompt_equals_transformers_template(llm, folder):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]
    out = llm.chat(messages, SamplingParams(max_tokens=5, **GREEDY), use_tqdm=False)[0]
    ref = AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, add_generation_prompt=True,
                                                                    tokenize=True, return_dict=False)
    assert out.prompt_token_ids == list(ref)
    assert out.message.role == "assistant" and out.message.content == out.request_output.outputs[0].text
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    two = llm.chat([messages, messages[1:]], SamplingParams(max_tokens=2, **GREEDY), use_tqdm=False)
    assert len(two) == 2


def test_bad_requests_are_rejected_and_leave_no_trace(llm):
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(InvalidRequest, match="maximum context length is 1024"):
        llm.generate([[5] * 1100], use_tqdm=False)
    with pytest.raises(InvalidRequest, match="token ids"):
        llm.generate([[10**6]], use_tqdm=False)
    with pytest.raises(ValueError, match="continue_final_message"):
        llm.chat([{"role": "user", "content": "x"}], continue_final_message=True)
    assert not llm.engine.has_unfinished() and not llm.engine.requests
    assert llm.engine.block_manager.num_free == llm.engine.block_manager.num_pages


def test_prefix_cache_prefills_only_the_suffix(folder, llm):
    system = _prompts(llm, [300], seed=8)[0]
    first, second = system + _prompts(llm, [7], seed=9)[0], system + _prompts(llm, [12], seed=10)[0]
    params = SamplingParams(max_tokens=6, **GREEDY)
    llm.generate([first], params, use_tqdm=False)
    before = llm.engine.stats()
    out = llm.generate([second], params, use_tqdm=False)[0]
    after = llm.engine.stats()
    cached = 300 // 8 * 8  # whole pages of the shared system prompt
    assert out.num_cached_tokens == cached
    # Computed: the uncached part of the prompt, then one step per generated token after the first.
    assert after["computed_tokens"] - before["computed_tokens"] == len(second) - cached + 5
    assert after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"] == cached
    uncached = LLM(str(folder), max_model_len=512, max_num_seqs=8, max_num_batched_tokens=32, page_size=8,
                   enable_prefix_caching=False, compile_cache_dir="", progress=False)
    ref = uncached.generate([second], params, use_tqdm=False)[0]
    assert ref.num_cached_tokens == 0
    assert ref.outputs[0].token_ids == out.outputs[0].token_ids


def test_logprobs_match_the_models_log_softmax(llm):
    prompt = _prompts(llm, [9], seed=11)[0]
    out = llm.generate([prompt], SamplingParams(max_tokens=4, logprobs=5, **GREEDY), use_tqdm=False)[0].outputs[0]
    logits, _ = run_logits(llm.engine.model, [prompt], decode_steps=3, feed=np.array([out.token_ids]))
    ref = logits[:, 0] - np.log(np.exp(logits[:, 0].astype(np.float64)).sum(-1, keepdims=True))
    assert len(out.logprobs) == 4
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert next(iter(entry)) == token and entry[token].rank == 1  # greedy: the chosen token is the top one
        assert len(entry) == 5
        top = np.argsort(-ref[step])[:5]
        assert [t for t in entry] == top.tolist()
        for t, lp in entry.items():
            assert abs(lp.logprob - ref[step, t]) < 1e-4
            if t != token:  # the chosen token is named by its piece of the text (see the streaming test)
                assert lp.decoded_token == llm.tokenizer.decode([t])
    assert "".join(next(iter(e.values())).decoded_token for e in out.logprobs) == out.text


def test_bias_allowed_banned_and_min_tokens(llm):
    prompt = _prompts(llm, [7], seed=12)[0]

    def run(**kw):
        return llm.generate([prompt], SamplingParams(max_tokens=8, **{**GREEDY, **kw}), use_tqdm=False)[0].outputs[0]

    plain = run()
    assert set(run(logit_bias={"42": 100}).token_ids) == {42}
    allowed = [5, 17, 99]
    assert set(run(allowed_token_ids=allowed, temperature=1.0, seed=3).token_ids) <= set(allowed)
    banned = set(plain.token_ids)
    assert not banned & set(run(banned_token_ids=sorted(banned)).token_ids)
    engine = llm.engine.core
    saved = engine.eos_token_ids
    engine.eos_token_ids = {plain.token_ids[0]}  # the model's first greedy token now counts as EOS
    try:
        stopped = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)[0].outputs[0]
        held = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, min_tokens=3,
                                                     stop_token_ids=[plain.token_ids[0]]), use_tqdm=False)[0].outputs[0]
    finally:
        engine.eos_token_ids = saved
    assert stopped.token_ids == plain.token_ids[:1]
    assert len(held.token_ids) >= 3 and plain.token_ids[0] not in held.token_ids[:3]


def test_penalties_discourage_repeats(llm):
    prompt = _prompts(llm, [5], seed=13)[0]
    plain = llm.generate([prompt], SamplingParams(max_tokens=30, **GREEDY), use_tqdm=False)[0].outputs[0].token_ids
    assert len(set(plain)) < len(plain)  # the tiny random model repeats itself when greedy
    penalized = llm.generate([prompt], SamplingParams(max_tokens=30, presence_penalty=2.0, frequency_penalty=2.0,
                                                      **GREEDY), use_tqdm=False)[0].outputs[0].token_ids
    assert len(set(penalized)) > len(set(plain))


def test_no_compilation_while_serving_200_random_requests(llm):
    rng = np.random.default_rng(14)
    vocab = llm.engine.model.cfg.vocab_size
    llm.generate(["warm"], SamplingParams(max_tokens=2), use_tqdm=False)
    before = llm.engine.stats()["compile_count"]
    prompts, params = [], []
    for _ in range(200):
        prompts.append(rng.integers(3, vocab, int(rng.integers(1, 200))).tolist())
        params.append(SamplingParams(
            n=int(rng.choice([1, 1, 1, 2])), temperature=float(rng.choice([0.0, 0.7, 1.3])),
            top_p=float(rng.choice([1.0, 0.9])), top_k=int(rng.choice([0, 5, 50])), min_p=float(rng.choice([0, 0.05])),
            presence_penalty=float(rng.choice([0, 0.5])), repetition_penalty=float(rng.choice([1.0, 1.2])),
            logit_bias={int(rng.integers(vocab)): 5.0} if rng.random() < 0.2 else None,
            logprobs=int(rng.integers(0, 6)) if rng.random() < 0.3 else None,
            min_tokens=int(rng.integers(0, 2)), max_tokens=int(rng.integers(2, 25)), seed=int(rng.integers(1000)),
            stop=["ab"] if rng.random() < 0.2 else None))
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert len(outs) == 200 and all(o.finished for o in outs)
    assert llm.engine.stats()["compile_count"] == before


def test_chat_with_tools_returns_parsed_tool_calls(llm):
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    # A random model never calls tools by itself: a regex constraint makes it write a Hermes call.
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    params = SamplingParams(max_tokens=200, temperature=0, structured_output=StructuredOutput(regex=re.escape(call)))
    out = llm.chat(messages, params, tools=[weather], use_tqdm=False)[0]
    assert out.request_output.outputs[0].text == call
    assert out.finish_reason == "tool_calls" and out.message.content is None
    assert out.message.tool_calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert out.message.tool_calls[0]["id"].startswith("call_")
    plain = llm.chat(messages, SamplingParams(max_tokens=5, temperature=0), use_tqdm=False)[0]
    assert plain.message.tool_calls is None and plain.finish_reason == "length"


def test_structured_output_json_schema_always_validates(llm):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "n"], "additionalProperties": False}
    params = [SamplingParams(max_tokens=60, temperature=1.0, seed=s,
                             structured_output=StructuredOutput.from_schema(schema)) for s in range(8)]
    outs = llm.generate(["Give me JSON"] * 8, params, use_tqdm=False)
    for o in outs:
        value = json.loads(o.outputs[0].text)
        assert set(value) == {"name", "n"} and isinstance(value["n"], int) and 0 <= value["n"] <= 99
        assert o.outputs[0].finish_reason == "stop"


def test_tiny_temperatures_keep_to_the_grammar(llm):
    # Found by fuzzing: at temperature 1e-9, a row with one allowed token turned NaN in the draw and id 0 broke
    # the grammar.
    prompt = "<|im_start|>tool\n<|im_end|>\n<|im_start|>assistant\n"
    params = [SamplingParams(max_tokens=20, temperature=t, seed=1, structured_output=StructuredOutput(regex="%H:%M:%S"))
              for t in (1e-40, 1e-9, 1e-5, 1e-3, 0.7)]
    outs = llm.generate([prompt] * 5, params, use_tqdm=False)
    assert [(o.outputs[0].text, o.outputs[0].finish_reason) for o in outs] == [("%H:%M:%S", "stop")] * 5


def test_constraints_that_allow_no_token_fail_clearly(llm):
    none_in_common = SamplingParams(max_tokens=10, temperature=0, allowed_token_ids=[0],
                                    structured_output=StructuredOutput(regex="ChatOutput"))
    # Once "yes" or "no" is written the grammar only allows EOS, which min_tokens still blocks.
    min_tokens_past_the_grammar = SamplingParams(max_tokens=30, temperature=0.7, min_tokens=25,
                                                 structured_output=StructuredOutput(choice=("yes", "no")))
    fine = SamplingParams(max_tokens=5, **GREEDY)
    outs = llm.generate(["hello"] * 3, [none_in_common, min_tokens_past_the_grammar, fine], use_tqdm=False)
    for o in outs[:2]:
        assert o.outputs[0].finish_reason == "error" and "no token satisfies" in o.outputs[0].error
    assert outs[1].outputs[0].text in ("yes", "no")
    assert outs[2].outputs[0].finish_reason == "length" and len(outs[2].outputs[0].token_ids) == 5
    assert llm.engine.block_manager.num_free == llm.engine.block_manager.num_pages


def test_stream_yields_the_same_text_as_generate(llm):
    params = SamplingParams(max_tokens=12, stop=["zz"], **GREEDY)
    messages = [{"role": "user", "content": "Hello world!"}]
    whole = llm.chat(messages, params, use_tqdm=False)[0].message.content
    pieces = list(llm.stream(messages, params))
    assert "".join(pieces) == whole and len(pieces) > 1
    gen = llm.stream("The quick brown fox", SamplingParams(max_tokens=100, **GREEDY))
    next(gen)
    gen.close()  # stopping early aborts the request and frees its pages
    assert not llm.engine.requests and llm.engine.block_manager.num_free == llm.engine.block_manager.num_pages
