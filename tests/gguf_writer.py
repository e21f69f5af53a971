"""Test utility: write a tiny HF checkpoint as a GGUF file the way llama.cpp's converter does.

It is written independently of jaxserve.weights.gguf_file (its own name table, its own Q/K permutation,
the gguf package's writer and quantizers), so that reading its output back tests the loader.
"""

from __future__ import annotations

import json
import math
import pathlib

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter
from gguf.quants import quantize
from safetensors.numpy import load_file

_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "gemma2": "gemma2",
         "gemma3_text": "gemma3", "mixtral": "llama", "qwen3_moe": "qwen3moe"}

_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.qkv_proj": "attn_qkv",  # phi3's fused tensors, stored fused
    "mlp.gate_up_proj": "ffn_up",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",  # a mixture of experts' router
    "mlp.experts.gate_exps": "ffn_gate_exps",  # its stacked experts (_split_experts)
    "mlp.experts.up_exps": "ffn_up_exps",
    "mlp.experts.down_exps": "ffn_down_exps",
}

# llama.cpp's names for Gemma's four norms (its converter also stores every Gemma norm weight plus 1).
_GEMMA_LAYER = _LAYER | {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                         "post_feedforward_layernorm": "post_ffw_norm"}

CONTROL, NORMAL, USER_DEFINED = 3, 1, 4  # llama.cpp token types


def gguf_name(hf_name: str, arch: str = "llama") -> str:
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.N.<module>.<weight|bias>
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{(_GEMMA_LAYER if arch.startswith('gemma') else _LAYER)[module]}.{kind}"


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter reorders each head's q/k rows from HF's rotate-half layout
    (pairs i, i + d/2) to interleaved pairs (2i, 2i+1)."""
    return (weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_gguf_from_hf(hf_folder, out_path, qtype_for=lambda name, shape: QT.F32, *, pre="gpt2",
                       tokenizer_meta=None, raw_tensors=None, general_name="tiny"):
    """Convert hf_folder (config.json, model.safetensors, tokenizer.json) to a GGUF at out_path.

    qtype_for(hf_name, shape) picks each tensor's type (1-D tensors are always F32, as in llama.cpp).
    tokenizer_meta overrides the tokenizer read from tokenizer.json (see tokenizer_meta_from_folder).
    raw_tensors maps hf_name -> (uint8 blocks, qtype) to store prepared bytes as they are, for
    types the gguf package can read but not write (the K-quants).
    """
    hf_folder = pathlib.Path(hf_folder)
    config = json.loads((hf_folder / "config.json").read_text())
    arch = _ARCH[config["model_type"]]
    tensors = load_file(hf_folder / "model.safetensors")
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)

    writer = GGUFWriter(str(out_path), arch)
    _write_config(writer, config, tensors, general_name)
    _write_tokenizer(writer, tokenizer_meta or tokenizer_meta_from_folder(hf_folder, pre))
    _write_rope_freqs(writer, config)
    if arch == "phi3":
        _write_phi3(writer, config)
    if arch.startswith("gemma"):
        _write_gemma(writer, config)
    raw_tensors = raw_tensors or {}
    for name, array in _split_experts(tensors, config).items():
        array = array.astype(np.float32)
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = config["num_attention_heads"] if ".q_proj." in name else config["num_key_value_heads"]
            array = llama_cpp_permute(array, heads)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            array = array + 1.0
        if name in raw_tensors:
            blocks, qtype = raw_tensors[name]
            writer.add_tensor(gguf_name(name, arch), blocks, raw_dtype=qtype)
            continue
        qtype = QT.F32 if array.ndim == 1 else qtype_for(name, array.shape)
        _add_tensor(writer, gguf_name(name, arch), array, qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _split_experts(tensors: dict, config: dict) -> dict:
    """transformers' fused expert tensors (mlp.experts.gate_up_proj [E, 2I, hidden], down_proj [E, hidden, I]) as
    llama.cpp's converter stores them: stacked gate, up and down, under names gguf_name maps to ffn_*_exps."""
    out = {}
    for name, array in tensors.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            gate, up = np.split(array, 2, axis=1)
            out |= {name.replace("gate_up_proj", "gate_exps.weight"): gate,
                    name.replace("gate_up_proj", "up_exps.weight"): up}
        elif name.endswith("mlp.experts.down_proj"):
            out[name.replace("down_proj", "down_exps.weight")] = array
        else:
            out[name] = array
    if config.get("num_local_experts") or config.get("num_experts"):
        assert not any(n.endswith("mlp.gate_proj.weight") for n in out), "llama.cpp's MoE files have no dense layers"
    return out


def _add_tensor(writer, name, array, qtype):
    if qtype == QT.F32:
        writer.add_tensor(name, array)
    elif qtype == QT.F16:
        writer.add_tensor(name, array.astype(np.float16))
    else:
        writer.add_tensor(name, quantize(array, qtype), raw_dtype=qtype)


def _write_config(writer, config, tensors, general_name):
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)  # Gemma 3 writes one per layer kind; the file keeps the full layers'
    writer.add_name(general_name)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config["num_key_value_heads"])
    if config["model_type"] != "phi3":  # llama.cpp's phi3 converter writes no head size
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(tensors["model.embed_tokens.weight"].shape[0])
    experts = config.get("num_local_experts") or config.get("num_experts")
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config["num_experts_per_tok"])
        if config["model_type"] == "qwen3_moe":
            writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
            writer.add_expert_weights_norm(bool(config["norm_topk_prob"]))


def _write_rope_freqs(writer, config):
    """llama3 scaling goes into the file only as per-frequency divisors, as llama.cpp writes it."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type") != "llama3":
        return
    theta = rope.get("rope_theta", config.get("rope_theta"))
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    low_wavelength = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
    high_wavelength = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    factors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * theta ** (i / head_dim)
        if wavelength < high_wavelength:
            factors.append(1.0)
        elif wavelength > low_wavelength:
            factors.append(rope["factor"])
        else:
            smooth = ((rope["original_max_position_embeddings"] / wavelength - rope["low_freq_factor"])
                      / (rope["high_freq_factor"] - rope["low_freq_factor"]))
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    writer.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))


def _write_phi3(writer, config):
    """As llama.cpp's converter: the original context, sliding window 0 for none, and longrope as the two factor
    tensors plus an attention factor computed from the context ratio."""
    rope = config.get("rope_parameters") or {}
    original = config["original_max_position_embeddings"]
    writer.add_rope_scaling_orig_ctx_len(original)
    writer.add_sliding_window(config.get("sliding_window") or 0)
    if rope.get("rope_type") != "longrope":
        return
    scale = config["max_position_embeddings"] / original
    writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
    writer.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
    writer.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))


def _write_gemma(writer, config):
    """As llama.cpp's converter: the window and Gemma 2's soft caps; Gemma 3's linear rope scaling (of its full
    layers). The layer pattern, query scale and local rope base are llama.cpp's constants, not file keys."""
    writer.add_sliding_window(config["sliding_window"])
    if config["model_type"] == "gemma2":
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    full = (config.get("rope_parameters") or {}).get("full_attention") or {}
    if full.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(full["factor"])


def tokenizer_meta_from_folder(hf_folder, pre="gpt2") -> dict:
    """GGUF tokenizer metadata for a byte-level BPE tokenizer.json (llama.cpp's "gpt2" model)."""
    hf_folder = pathlib.Path(hf_folder)
    spec = json.loads((hf_folder / "tokenizer.json").read_text())
    tok_config_path = hf_folder / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text()) if tok_config_path.exists() else {}
    vocab = dict(spec["model"]["vocab"])
    types = {}
    for added in spec["added_tokens"]:
        vocab[added["content"]] = added["id"]
        types[added["id"]] = CONTROL if added["special"] else USER_DEFINED
    tokens = [None] * (max(vocab.values()) + 1)
    for token, index in vocab.items():
        tokens[index] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]

    def index_of(name):
        value = tok_config.get(name)
        return vocab.get(value) if value else None

    return {
        "model": "gpt2", "pre": pre, "tokens": tokens, "merges": merges,
        "token_types": [types.get(i, NORMAL) for i in range(len(tokens))],
        "bos": index_of("bos_token"), "eos": index_of("eos_token"),
        "unk": index_of("unk_token"), "pad": index_of("pad_token"),
        "add_bos": False, "chat_template": tok_config.get("chat_template"),
    }


def _write_tokenizer(writer, meta):
    writer.add_tokenizer_model(meta["model"])
    if meta.get("pre"):
        writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["token_types"])
    if meta.get("merges"):
        writer.add_token_merges(meta["merges"])
    if meta.get("scores") is not None:
        writer.add_token_scores(meta["scores"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if meta.get(key) is not None:
            add(meta[key])
    if meta.get("add_bos") is not None:
        writer.add_add_bos_token(meta["add_bos"])
    if meta.get("add_space_prefix") is not None:
        writer.add_add_space_prefix(meta["add_space_prefix"])
    if meta.get("chat_template"):
        writer.add_chat_template(meta["chat_template"])
