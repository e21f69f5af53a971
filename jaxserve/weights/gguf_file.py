"""Load a GGUF file (llama.cpp's format) as a transformers-style config, tensors under Hugging Face names and
layout, and a fast tokenizer built from the file's metadata. Matrices of the types in gguf_blocks.KEPT stay in
integer form as QArrays (keep_quantized=True); everything else is dequantized to float32 numpy arrays.

Supported: architectures llama (also Mistral and SmolLM2, which llama.cpp stores as llama), qwen2,
qwen3, phi3 (Phi-3 and Phi-4-mini weights), gemma2 and gemma3 (its text decoder), and the mixtures of experts
qwen3moe and llama with experts (Mixtral), their stacked 3-D expert tensors dequantized; the tensor types in
SUPPORTED_TENSOR_TYPES; tokenizers of type "gpt2" (byte-level BPE) and "llama" (SentencePiece BPE with byte fallback).
"""

from __future__ import annotations

import math
import os
import pathlib
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import jax
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.quants import dequantize
from tqdm.auto import tqdm

from jaxserve.quantization import gguf_blocks

_ARCHITECTURES = {  # GGUF general.architecture -> (model_type, HF class)
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "phi3": ("phi3", "Phi3ForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
}

SUPPORTED_TENSOR_TYPES = frozenset({
    QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1,
    QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K,
})

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_LAYER_NAMES = {  # GGUF blk.N.<key> -> model.layers.N.<value>
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",  # phi3 (which may also store q, k, v apart)
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",  # a mixture of experts' router
}
# A mixture of experts' stacked experts, [experts, out, in] as numpy reads them: gate and up become transformers'
# fused mlp.experts.gate_up_proj (models/moe.py), down its mlp.experts.down_proj.
_EXPERT_PARTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")

# Gemma's sandwich norms. llama.cpp stores each Gemma norm weight as 1 + w (its RMSNorm multiplies by the weight);
# transformers keeps w, so 1 is taken off at load.
_GEMMA_LAYER_NAMES = _LAYER_NAMES | {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GEMMA_ARCHS = ("gemma2", "gemma3")

_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# llama.cpp stores llama3 rope scaling only as this per-frequency tensor; it is turned back into
# config values, not returned as a weight.
_ROPE_FREQS = "rope_freqs.weight"
# phi3's longrope factors [rotary_dim // 2], likewise config values (llama.cpp picks one set by its context size).
_ROPE_FACTORS = {"short_factor": "rope_factors_short.weight", "long_factor": "rope_factors_long.weight"}


@dataclass(frozen=True)
class GGUFModel:
    hf_config: dict
    tensors: dict
    tokenizer: "transformers.PreTrainedTokenizerFast"  # noqa: F821
    eos_token_ids: tuple


def load_gguf(path, *, keep_quantized=False, progress=True) -> GGUFModel:
    """keep_quantized: keep the matrices of the types gguf_blocks.KEPT lists as QArrays (a bool, or a function of
    the tensor's name and type). Raises FileNotFoundError for a missing file, ValueError for a garbled one or for an
    architecture, tensor type or tokenizer this loader does not support."""
    path = pathlib.Path(path)
    reader = _open(path)
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {sorted(_ARCHITECTURES)}.")
    _check_tensor_types(reader, path)

    raw = _read_all(reader, keep_quantized, progress)
    config = _hf_config(meta, arch, raw)
    tensors = _hf_tensors(raw, arch, config)
    tokenizer = build_tokenizer(meta)
    eos_ids = tuple(dict.fromkeys(
        meta[key] for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                              "tokenizer.ggml.eom_token_id") if key in meta))
    return GGUFModel(hf_config=config, tensors=tensors, tokenizer=tokenizer, eos_token_ids=eos_ids)


# ---------------------------------------------------------------------------------------- reading

def _open(path: pathlib.Path) -> GGUFReader:
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader fails in many ways (bad magic, short reads) on a garbled file
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e
    for t in reader.tensors:
        # A truncated file still maps; its last tensors just come out short.
        if t.data.nbytes != t.n_bytes:
            raise ValueError(f"{path} is truncated: tensor {t.name} has {t.data.nbytes} of {t.n_bytes} bytes.")
    return reader


def _metadata(reader: GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def _check_tensor_types(reader: GGUFReader, path: pathlib.Path) -> None:
    found = {t.tensor_type for t in reader.tensors} - SUPPORTED_TENSOR_TYPES
    if found:
        raise ValueError(
            f"{path}: tensor types {sorted(t.name for t in found)} are not supported; "
            f"supported: {sorted(t.name for t in SUPPORTED_TENSOR_TYPES)}.")


def _read_all(reader: GGUFReader, keep_quantized, progress: bool) -> dict:
    """GGUF name -> float32 array or QArray in numpy (row-major) order, i.e. HF's [out, in] for matrices.
    keep_quantized: bool, or keep_quantized(name, tensor type) -> bool per matrix."""
    def one(t):
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists the fastest dimension first
        keep = keep_quantized(t.name, t.tensor_type) if callable(keep_quantized) else keep_quantized
        if keep and t.tensor_type in gguf_blocks.KEPT and len(shape) == 2:
            return gguf_blocks.from_gguf(t.data, t.tensor_type, shape)
        array = dequantize(t.data, t.tensor_type)
        # F32 comes back as a view of the file's memory map; copy it so the map can close
        array = array.copy() if t.tensor_type == QT.F32 else array.astype(np.float32, copy=False)
        return array.reshape(shape)

    # numpy releases the GIL in the bulk of this work, so threads use the cores
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        arrays = tqdm(pool.map(one, reader.tensors), total=len(reader.tensors),
                      desc="Reading GGUF tensors", unit="tensor", disable=not progress)
        return {t.name: array for t, array in zip(reader.tensors, arrays)}


# ----------------------------------------------------------------------------------------- config

def _hf_config(meta: dict, arch: str, raw: dict) -> dict:
    def key(name, default=None):
        return meta.get(f"{arch}.{name}", default)

    model_type, hf_class = _ARCHITECTURES[arch]
    # llama.cpp writes Mistral checkpoints as "llama"; only the name tells them apart.
    if arch == "llama" and "mistral" in str(meta.get("general.name", "")).lower():
        model_type, hf_class = "mistral", "MistralForCausalLM"

    hidden = key("embedding_length")
    heads = key("attention.head_count")
    head_dim = key("attention.key_length") or key("rope.dimension_count") or hidden // heads
    rope_theta = _decimal(key("rope.freq_base", 10000.0))
    config = {
        "model_type": model_type,
        "architectures": [hf_class],
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": _decimal(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(meta, arch, raw.get(_ROPE_FREQS), rope_theta, head_dim),
        "max_position_embeddings": key("context_length"),
        # the embedding's rows, not the tokenizer's length: they can differ (padded vocabularies)
        "vocab_size": raw["token_embd.weight"].shape[0],
        "tie_word_embeddings": "output.weight" not in raw,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "attention_bias": "blk.0.attn_q.bias" in raw,
        "torch_dtype": "float32",  # float tensors are read as float32
    }
    if model_type == "mistral":
        config["sliding_window"] = None  # llama.cpp's llama architecture has no sliding window
    if arch == "phi3":
        config |= _phi3_config(meta, raw, config)
    if arch in _GEMMA_ARCHS:
        config |= _gemma_config(meta, arch, config)
    if key("expert_count"):
        config |= _moe_config(meta, arch)
    return config


def _moe_config(meta: dict, arch: str) -> dict:
    """llama.cpp's qwen3moe, and its llama with experts (Mixtral): every layer sparse, the top experts' weights
    renormalized (llama.cpp's graph does unless the file says expert_weights_norm false)."""
    config = {"num_experts_per_tok": meta[f"{arch}.expert_used_count"],
              "norm_topk_prob": bool(meta.get(f"{arch}.expert_weights_norm", True))}
    if arch == "llama":
        return config | {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
                         "num_local_experts": meta["llama.expert_count"], "sliding_window": None}
    return config | {"num_experts": meta[f"{arch}.expert_count"],
                     "moe_intermediate_size": meta[f"{arch}.expert_feed_forward_length"]}


# llama.cpp's 27B Gemma 2 / 3 (by layer count) scale attention by hidden / heads, the others by the head size: what
# transformers' configs write as query_pre_attn_scalar, which GGUF files do not carry.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _gemma_config(meta: dict, arch: str, config: dict) -> dict:
    """What llama.cpp's gemma2 / gemma3 keep in code rather than in the file: tanh-gelu, the query scale, Gemma 2's
    alternating and Gemma 3's 5-sliding-to-1-full layers, Gemma 3's local rope base (10000)."""
    big = config["num_hidden_layers"] == _GEMMA_27B_LAYERS[arch]
    out = {"hidden_activation": "gelu_pytorch_tanh", "sliding_window": meta.get(f"{arch}.attention.sliding_window"),
           "query_pre_attn_scalar": config["hidden_size"] // config["num_attention_heads"] if big
           else config["head_dim"]}
    if arch == "gemma2":
        out |= {"attn_logit_softcapping": _decimal(meta.get("gemma2.attn_logit_softcapping")),
                "final_logit_softcapping": _decimal(meta.get("gemma2.final_logit_softcapping"))}
    else:
        out |= {"sliding_window_pattern": 6, "rope_local_base_freq": 10000.0}
    return out


def _phi3_config(meta: dict, raw: dict, config: dict) -> dict:
    """llama.cpp's phi3 writes no head size, and its rope dimension count is the rotary part of a head (Phi-4-mini:
    3/4); longrope is the two factor tensors, the original context and the attention factor; sliding window 0 means
    none (Phi-4)."""
    head_dim = meta.get("phi3.attention.key_length") or config["hidden_size"] // config["num_attention_heads"]
    original = meta.get("phi3.rope.scaling.original_context_length")
    out = {"head_dim": head_dim, "partial_rotary_factor": meta.get("phi3.rope.dimension_count", head_dim) / head_dim,
           "sliding_window": meta.get("phi3.attention.sliding_window") or None}
    if _ROPE_FACTORS["long_factor"] in raw:
        out["original_max_position_embeddings"] = original
        out["rope_scaling"] = {"rope_type": "longrope", "original_max_position_embeddings": original,
                               "attention_factor": float(meta.get("phi3.rope.scaling.attn_factor", 1.0)),
                               **{k: np.asarray(raw[name], np.float64).tolist() for k, name in _ROPE_FACTORS.items()}}
    return out


def _decimal(value):
    """GGUF stores these as float32: 1e-5 reads back as 9.99999974e-06. Recover the decimal written."""
    return None if value is None else float(str(np.float32(value)))


def _rope_scaling(meta: dict, arch: str, rope_freqs, rope_theta: float, head_dim: int):
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if kind == "linear":
        return {"rope_type": "linear", "factor": _decimal(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": _decimal(factor), "original_max_position_embeddings": original}
        for name in ("beta_fast", "beta_slow"):
            if f"{arch}.rope.scaling.yarn_{name}" in meta:
                scaling[name] = _decimal(meta[f"{arch}.rope.scaling.yarn_{name}"])
        return scaling
    if kind not in (None, "none"):
        raise ValueError(f"rope scaling type {kind!r} is not supported; supported: linear, yarn, llama3.")
    if rope_freqs is not None:
        return _llama3_scaling(np.asarray(rope_freqs, np.float64), rope_theta, head_dim, original or 8192)
    return None


def _llama3_scaling(freq_factors, rope_theta, head_dim, original_context):
    """Recover HF's llama3 rope parameters from llama.cpp's per-frequency divisors.

    In the band between the two cutoffs the divisor d satisfies 1/d = (1-s)/factor + s with
    s = (original_context / wavelength - low) / (high - low), so s is linear in 1/wavelength.
    Only the ratios original/low and original/high matter, hence original_context is free (the
    file's value if it has one, else Llama 3's 8192) and low/high follow from a line fit.
    """
    factor = float(freq_factors.max())
    if np.allclose(freq_factors, 1.0):
        return None
    inv_wavelength = rope_theta ** (-np.arange(0, head_dim, 2) / head_dim) / (2 * math.pi)
    band = (freq_factors > 1 + 1e-4) & (freq_factors < factor * (1 - 1e-4))
    if band.sum() < 2:
        raise ValueError("cannot recover llama3 rope scaling from rope_freqs: fewer than 2 smoothed frequencies.")
    s = (1 / freq_factors[band] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(inv_wavelength[band], s, 1)
    low = -intercept * original_context / slope
    high = low + original_context / slope
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
               "high_freq_factor": float(high), "original_max_position_embeddings": int(original_context)}
    rebuilt = llama3_freq_factors(scaling, rope_theta, head_dim)
    if not np.allclose(rebuilt, freq_factors, rtol=1e-4):
        raise ValueError("rope_freqs does not follow llama3 rope scaling; this loader cannot express it.")
    return scaling


def llama3_freq_factors(scaling: dict, rope_theta: float, head_dim: int) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores as rope_freqs for a llama3 rope_scaling dict."""
    wavelength = 2 * math.pi * rope_theta ** (np.arange(0, head_dim, 2) / head_dim)
    original = scaling["original_max_position_embeddings"]
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    smooth = np.clip((original / wavelength - low) / (high - low), 0.0, 1.0)
    # smooth is 0 past the low-frequency cutoff (divide by factor) and 1 before the high one (keep)
    return 1 / ((1 - smooth) / factor + smooth)


# ---------------------------------------------------------------------------------------- tensors

def _hf_tensors(raw: dict, arch: str, config: dict) -> dict:
    gemma = arch in _GEMMA_ARCHS
    layer_names = _GEMMA_LAYER_NAMES if gemma else _LAYER_NAMES
    tensors = {}
    experts = {}  # layer -> {part: array}
    for name, array in raw.items():
        if name == _ROPE_FREQS or name in _ROPE_FACTORS.values():
            continue
        if gemma and name.endswith("norm.weight"):  # norms are 1-D: never quantized
            array = np.asarray(array) - 1.0
        if name in _GLOBAL_NAMES:
            tensors[_GLOBAL_NAMES[name]] = array
            continue
        match = _LAYER_TENSOR.fullmatch(name)
        if not match or match.group(2) not in layer_names and match.group(2) not in _EXPERT_PARTS:
            raise ValueError(f"unexpected tensor {name!r} in a {arch} GGUF file.")
        layer, part, kind = match.groups()
        if part in _EXPERT_PARTS:
            experts.setdefault(layer, {})[part] = array
            continue
        if arch == "llama" and part in ("attn_q", "attn_k"):
            heads = config["num_attention_heads"] if part == "attn_q" else config["num_key_value_heads"]
            array = jax.tree.map(lambda a, heads=heads: unpermute_rotary(a, heads), array)  # a QArray's rows too
        # phi3's ffn_up holds gate and up (in that order), as transformers' gate_up_proj does
        hf_part = "mlp.gate_up_proj" if arch == "phi3" and part == "ffn_up" else layer_names[part]
        tensors[f"model.layers.{layer}.{hf_part}.{kind}"] = array
    for layer, parts in experts.items():
        gate, up, down = (parts[p] for p in _EXPERT_PARTS)
        tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = np.concatenate([gate, up], axis=1)
        tensors[f"model.layers.{layer}.mlp.experts.down_proj"] = down
    return tensors


def unpermute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k rows for the llama architecture.

    Within each head, HF's rotary layout pairs row i with row i + head_dim/2 (rotate_half); llama.cpp
    interleaves them as (0, h/2, 1, h/2+1, ...) for its GPT-J-style rope. Rows stored as
    [head, half, pair] go back to [head, pair, half]. Works on biases (1-D) too.
    """
    rows = weight.shape[0]
    head_dim = rows // n_heads
    return (weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


# -------------------------------------------------------------------------------------- tokenizer

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

# Pre-tokenizer split patterns by tokenizer.ggml.pre, as the models' own tokenizer.json define them.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
           "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
# Pre-tokenizers that are GPT-2's own regex (ByteLevel's built-in), and those that split off every
# digit first, grouped as llama.cpp groups them. (transformers uses plain GPT-2 for the digit group;
# the two agree on SmolLM2's vocabulary, which has no merges of digits.)
_GPT2_PRES = {None, "gpt2", "mpt", "olmo", "jais"}
_DIGIT_PRES = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}

# tokenizer.ggml.model -> the tokenizer.ggml.pre values handled (a file without one is read as GPT-2)
SUPPORTED_TOKENIZERS = {"gpt2": sorted(p for p in _GPT2_PRES | _DIGIT_PRES | set(_SPLITS) if p),
                        "llama": ["(SentencePiece BPE with byte fallback; no pre-tokenizer)"]}


def build_tokenizer(meta: dict):
    """A PreTrainedTokenizerFast equivalent to the one transformers builds from the same GGUF."""
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta["tokenizer.ggml.tokens"]
    if kind == "gpt2":
        backend, add_bos = _byte_level_bpe(meta, tokens), meta.get("tokenizer.ggml.add_bos_token", False)
    elif kind == "llama":
        # SentencePiece files that do not say otherwise get BOS, as in llama.cpp
        backend, add_bos = _sentencepiece_bpe(meta, tokens), meta.get("tokenizer.ggml.add_bos_token", True)
    else:
        raise ValueError(f"GGUF tokenizer {kind!r} is not supported; supported: {sorted(SUPPORTED_TOKENIZERS)}.")
    _add_special_tokens(backend, tokens, meta.get("tokenizer.ggml.token_type") or [], byte_level=kind == "gpt2")

    def token(key):
        index = meta.get(f"tokenizer.ggml.{key}")
        return None if index is None else tokens[index]

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"), pad_token=token("padding_token_id"),
        add_bos_token=add_bos, add_eos_token=meta.get("tokenizer.ggml.add_eos_token", False),
        chat_template=meta.get("tokenizer.chat_template"),
    )


def _byte_level_bpe(meta: dict, tokens: list):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    # A few converters store a token as plain text instead of in the byte alphabet; respell those.
    vocab = {(t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode())): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))

    pre = meta.get("tokenizer.ggml.pre")
    if pre in _SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in _DIGIT_PRES:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
    elif pre in _GPT2_PRES:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: {SUPPORTED_TOKENIZERS['gpt2']}.")
    backend.decoder = decoders.ByteLevel()
    return backend


def _byte_alphabet() -> dict:
    """GPT-2's map from bytes to printable characters, in which byte-level vocabularies are spelled."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


def _sentencepiece_bpe(meta: dict, tokens: list):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_scores(vocab, meta["tokenizer.ggml.scores"])
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    return backend


def _merges_from_scores(vocab: dict, scores: list) -> list:
    """SentencePiece BPE files carry scores instead of merges: every split of a token into two
    vocabulary pieces is a merge, ranked by the merged token's score (higher merges first)."""
    candidates = []
    for token, index in vocab.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                # ties keep vocabulary order, as transformers' converter does
                candidates.append((-scores[index], -len(left), -len(right), index, left, right))
    return [(left, right) for *_, left, right in sorted(candidates)]


def _add_special_tokens(backend, tokens: list, token_types: list, *, byte_level: bool) -> None:
    """Control tokens become special tokens and user-defined ones plain added tokens, so both are
    matched whole instead of being cut by BPE."""
    from tokenizers import AddedToken

    spelled = set(_byte_alphabet().values())
    # In a byte-level vocabulary a control token outside the byte alphabet is a mislabel, not a token
    control = [AddedToken(t, normalized=False, special=True) for t, kind in zip(tokens, token_types)
               if kind == _CONTROL and (not byte_level or set(t) <= spelled)]
    backend.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False) for t, kind in zip(tokens, token_types)
            if kind == _USER_DEFINED]
    backend.add_tokens(user)
