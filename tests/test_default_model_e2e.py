"""End to end with the real embedded model (SmolLM2-135M-Instruct, GGUF Q4_1)."""

import torch

from jaxserve import SamplingParams
from jaxserve.weights.default_model import default_model_path

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_greedy_chat_answers_paris(default_llm):
    out = default_llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0]
    assert "Paris" in out.message.content
    assert out.finish_reason == "stop"


def test_first_20_greedy_tokens_equal_transformers_from_the_same_gguf(default_llm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path(progress=False)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False)
    out = default_llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    assert out.prompt_token_ids == list(ids)  # same chat prompt as transformers builds
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=2)
    assert out.token_ids == ref[0, len(ids):].tolist()


def test_no_compilation_after_warm_up(default_llm):
    before = default_llm.engine.stats()["compile_count"]
    prompts = ["Tell me a story.", "a " * 150, "Hi"]
    params = [SamplingParams(temperature=0, max_tokens=5), SamplingParams(temperature=0.8, top_p=0.9, seed=1,
              max_tokens=12), SamplingParams(temperature=1.0, top_k=20, max_tokens=3)]
    default_llm.generate(prompts, params, use_tqdm=False)
    assert default_llm.engine.stats()["compile_count"] == before


def test_default_model_samples_as_its_card_recommends(default_llm):
    """The GGUF carries no generation config, so the embedded model's card values are its defaults."""
    from jaxserve.weights import default_model

    params = default_llm.get_default_sampling_params()
    assert default_model.SAMPLING == {"temperature": 0.2, "top_p": 0.9}
    assert (params.temperature, params.top_p) == (0.2, 0.9)
