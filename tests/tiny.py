"""Tiny random checkpoints for tests: a transformers config, random weights and a small BPE tokenizer, written
without torch (so the suite's torch-free tests run where torch is not installed)."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from jaxserve import models
from jaxserve.models.config import ModelConfig

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
    "Hello world! How are you today? I am fine, thank you. 12345 67890",
    "jax serve models on tpu gpu and cpu with paged attention and continuous batching",
    "Ünïcödé tëxt, 日本語, emoji 🙂 and symbols: {}[]()<>=+-*/",
]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                  "gemma3_text": "Gemma3ForCausalLM", "mixtral": "MixtralForCausalLM",
                  "qwen3_moe": "Qwen3MoeForCausalLM"}


def make_checkpoint(folder: pathlib.Path, model_type: str = "llama", seed: int = 0, **overrides):
    """Writes a 2-layer random float32 model of `model_type` (a key of _ARCHITECTURES) with its tokenizer:
    matrices drawn from N(0, 0.2) (wide enough that logits differ visibly), vectors (norms, biases) from
    U(0.5, 1.5)."""
    from safetensors.numpy import save_file
    from transformers import AutoConfig, GenerationConfig

    tokenizer = make_tokenizer(400)
    vocab = len(tokenizer)
    kwargs = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    config.architectures = [_ARCHITECTURES[model_type]]
    rng = np.random.default_rng(seed)
    shapes = models.family(model_type).hf_shapes(ModelConfig.from_hf(config.to_dict()))
    tensors = {name: (rng.normal(0.0, 0.2, shape) if len(shape) > 1 else rng.uniform(0.5, 1.5, shape))
               .astype(np.float32) for name, shape in shapes.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    path = folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"dtype": "float32"}, indent=2))
    GenerationConfig.from_model_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
