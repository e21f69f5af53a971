"""GGUF loading: tensors, config and tokenizer read back from files written like llama.cpp writes them,
checked against the originals and against transformers' own GGUF loading."""

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFWriter
from safetensors.numpy import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from gguf_writer import CONTROL, NORMAL, write_gguf_from_hf
from jaxserve.weights.gguf_file import load_gguf

torch.set_num_threads(1)

HALF_ULP = 2.0 ** -11  # float16 scales: relative rounding error of at most half an ulp

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024, and we'll see 12345 foxes!",
    "Hello world, hello there. Don't stop: 3.14159 is pi; naïve café résumé.",
    "def f(x):\n    return x * 2  # doubling\n\n\tindented\ttabs",
    "Grüße aus Köln! 日本語のテキスト。 Emojis 😀🎉 too.",
] * 20

STRINGS = [
    "Hello world",
    " leading space and  double  spaces",
    "It's numbers 1234567 and 3.14, we'll see",
    "naïve café 日本語 😀🎉 unseen: ЖЩ ∑",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "<think>reasoning</think> after",
    "line\n\n\nbreaks\r\n\ttabs   ",
    "",
]

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ----------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def byte_level_tokenizer_dir(tmp_path_factory):
    """A tiny GPT-2-style byte-level BPE (about 300 tokens) with special and user-defined tokens."""
    folder = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens(["<think>", "</think>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE}))
    return folder


def _config(model_type, vocab_size):
    common = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=vocab_size, max_position_embeddings=16384,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    if model_type == "llama":
        # untied, with llama3 rope scaling: three of the eight frequencies fall in the smoothed band
        return AutoConfig.for_model("llama", tie_word_embeddings=False, rope_scaling={
            "rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 16.0, "original_max_position_embeddings": 2048}, rope_theta=5000.0, **common)
    return AutoConfig.for_model(model_type, tie_word_embeddings=True, rope_theta=20000.0, **common)


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory, byte_level_tokenizer_dir):
    """Tiny random checkpoints saved by transformers, one per architecture."""
    vocab_size = Tokenizer.from_file(str(byte_level_tokenizer_dir / "tokenizer.json")).get_vocab_size()
    dirs = {}
    for model_type in ("llama", "qwen2", "qwen3"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(model_type, vocab_size))
        # random norms so a swapped or dropped norm shows in the logits
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
        folder = tmp_path_factory.mktemp(model_type)
        model.save_pretrained(folder, safe_serialization=True)
        for f in byte_level_tokenizer_dir.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        dirs[model_type] = folder
    return dirs


def _originals(folder):
    return {k: v.astype(np.float32) for k, v in load_file(folder / "model.safetensors").items()}


# ------------------------------------------------------------------------- quantization bounds

def _error_bound(original, qtype):
    """Largest error per element the format allows, computed per 32-element block from the block's values.

    Q8_0: step d = amax/127, round to nearest: d/2. Q4_0/Q5_0: d = amax/8 (/16) and the level on the
    far side of zero is one short, so up to d. Q4_1/Q5_1: d = (max-min)/15 (/31), min offset, round
    to nearest: d/2. The float16 scale d and offset add up to levels*d*2^-11 and |min|*2^-11.
    """
    blocks = original.reshape(-1, 32).astype(np.float64)
    amax, lo, hi = np.abs(blocks).max(1), blocks.min(1), blocks.max(1)
    if qtype == QT.Q8_0:
        d = amax / 127
        bound = d / 2 + 127 * d * HALF_ULP
    elif qtype in (QT.Q4_0, QT.Q5_0):
        levels = 8 if qtype == QT.Q4_0 else 16
        d = amax / levels
        bound = d + levels * d * HALF_ULP
    elif qtype in (QT.Q4_1, QT.Q5_1):
        levels = 15 if qtype == QT.Q4_1 else 31
        d = (hi - lo) / levels
        bound = d / 2 + levels * d * HALF_ULP + np.abs(lo) * HALF_ULP
    else:
        raise AssertionError(qtype)
    return np.repeat(bound * (1 + 1e-6), 32).reshape(original.shape)


LLAMA_TYPES = {
    "model.embed_tokens.weight": QT.Q8_0, "lm_head.weight": QT.Q4_1, "q_proj": QT.Q8_0, "k_proj": QT.Q4_0,
    "v_proj": QT.Q4_1, "o_proj": QT.Q5_0, "gate_proj": QT.Q5_1, "up_proj": QT.F16, "down_proj": QT.BF16,
}


def _type_for(name, shape):
    for key, qtype in LLAMA_TYPES.items():
        if key in name:
            return qtype
    return QT.F32


# ---------------------------------------------------------------------------------------- tensors

@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_quantized_tensors_within_format_error(arch, hf_dirs, tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf_from_hf(hf_dirs[arch], path, _type_for)
    loaded = load_gguf(path, progress=False)
    originals = _originals(hf_dirs[arch])
    if loaded.hf_config["tie_word_embeddings"]:
        originals.pop("lm_head.weight", None)
    assert set(loaded.tensors) == set(originals)

    checked = set()
    for name, original in originals.items():
        got = loaded.tensors[name]
        assert got.dtype == np.float32 and got.shape == original.shape, name
        qtype = QT.F32 if original.ndim == 1 else _type_for(name, original.shape)
        if qtype == QT.F32:
            np.testing.assert_array_equal(got, original, err_msg=name)
        elif qtype == QT.F16:
            np.testing.assert_array_equal(got, original.astype(np.float16).astype(np.float32), err_msg=name)
        elif qtype == QT.BF16:  # round to nearest even, like ml_dtypes
            np.testing.assert_array_equal(got, original.astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=name)
        else:
            error = np.abs(got.astype(np.float64) - original)
            bound = _error_bound(original, qtype)
            assert (error <= bound).all(), f"{name} ({qtype.name}): max excess {(error - bound).max()}"
            assert error.max() > 0, f"{name}: {qtype.name} should be lossy on random weights"
        checked.add(qtype)
    assert {QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.F16, QT.BF16, QT.F32} <= checked


def test_llama_qk_permutation_round_trips_exactly(hf_dirs, tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf_from_hf(hf_dirs["llama"], path)
    originals = _originals(hf_dirs["llama"])
    stored = {t.name: np.asarray(t.data) for t in GGUFReader(path).tensors}
    loaded = load_gguf(path, progress=False).tensors
    for proj, part in (("q_proj", "attn_q"), ("k_proj", "attn_k")):
        for layer in range(2):
            name = f"model.layers.{layer}.self_attn.{proj}.weight"
            # the file really holds llama.cpp's row order, so the loader had something to undo
            assert not np.array_equal(stored[f"blk.{layer}.{part}.weight"], originals[name])
            np.testing.assert_array_equal(loaded[name], originals[name])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_config_and_tensors_reproduce_transformers_logits(arch, hf_dirs, tmp_path):
    """The config dict and tensors, handed to transformers, give the original model's logits:
    this checks head_dim, rope theta and scaling, tying, biases and norms all together."""
    path = tmp_path / "m.gguf"
    write_gguf_from_hf(hf_dirs[arch], path)
    loaded = load_gguf(path, progress=False)
    config = loaded.hf_config
    assert config["model_type"] == arch
    assert config["architectures"] == [json.loads((hf_dirs[arch] / "config.json").read_text())["architectures"][0]]

    original = AutoModelForCausalLM.from_pretrained(hf_dirs[arch], dtype=torch.float32)
    rebuilt = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    missing, unexpected = rebuilt.load_state_dict({k: torch.from_numpy(v) for k, v in loaded.tensors.items()},
                                                  strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    rebuilt.tie_weights()
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, original(ids).logits, rtol=1e-5, atol=1e-5)


def test_llama3_rope_scaling_recovered_from_rope_freqs(hf_dirs, tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    path = tmp_path / "m.gguf"
    write_gguf_from_hf(hf_dirs["llama"], path)
    assert "rope_freqs.weight" in {t.name for t in GGUFReader(path).tensors}
    config = load_gguf(path, progress=False).hf_config
    assert config["rope_scaling"]["rope_type"] == "llama3"
    assert config["rope_scaling"]["factor"] == pytest.approx(8.0)
    rebuilt = AutoConfig.for_model(**config)
    original = AutoConfig.from_pretrained(hf_dirs["llama"])
    inv_rebuilt, _ = ROPE_INIT_FUNCTIONS["llama3"](rebuilt, "cpu")
    inv_original, _ = ROPE_INIT_FUNCTIONS["llama3"](original, "cpu")
    torch.testing.assert_close(inv_rebuilt, inv_original, rtol=1e-5, atol=0)


def test_no_rope_scaling_without_rope_freqs(hf_dirs, tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf_from_hf(hf_dirs["qwen3"], path)
    assert load_gguf(path, progress=False).hf_config["rope_scaling"] is None


def _random_k_blocks(qtype, rows, cols, rng):
    """Random K-quant blocks with finite float16 scales (gguf can read these types but not write them)."""
    block_bytes, scale_offsets = {
        QT.Q2_K: (84, (80, 82)), QT.Q3_K: (110, (108,)), QT.Q4_K: (144, (0, 2)),
        QT.Q5_K: (176, (0, 2)), QT.Q6_K: (210, (208,)),
    }[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // 256, block_bytes), dtype=np.uint8)
    for offset in scale_offsets:
        scales = rng.uniform(0.001, 0.01, size=(rows, cols // 256)).astype(np.float16)
        blocks[..., offset:offset + 2] = scales[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K])
def test_k_quants_match_transformers_dequantization(qtype, hf_dirs, tmp_path):
    from transformers.integrations.gguf.dequant import dequantize as reference_dequantize

    name = "model.layers.1.mlp.down_proj.weight"  # [64, 256]: one 256-element super-block per row
    blocks = _random_k_blocks(qtype, 64, 256, np.random.default_rng(int(qtype)))
    path = tmp_path / "m.gguf"
    write_gguf_from_hf(hf_dirs["qwen2"], path, raw_tensors={name: (blocks, qtype)})
    got = load_gguf(path, progress=False).tensors[name]
    expected = reference_dequantize(torch.from_numpy(blocks.copy()), int(qtype)).reshape(64, 256).numpy()
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------ errors

def test_unsupported_architecture_is_named(tmp_path):
    path = tmp_path / "falcon.gguf"
    writer = GGUFWriter(str(path), "falcon")
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"'falcon'.*supported.*llama.*qwen2.*qwen3"):
        load_gguf(path, progress=False)


def test_unsupported_tensor_type_is_named(hf_dirs, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"  # [256, 64]: IQ4_NL blocks of 32 are 18 bytes
    blocks = np.random.default_rng(0).integers(0, 256, size=(256, 2 * 18), dtype=np.uint8)
    path = tmp_path / "m.gguf"
    write_gguf_from_hf(hf_dirs["qwen2"], path, raw_tensors={name: (blocks, QT.IQ4_NL)})
    with pytest.raises(ValueError, match=r"IQ4_NL.*not supported.*supported:.*Q4_K"):
        load_gguf(path, progress=False)


def test_unsupported_pre_tokenizer_is_named(hf_dirs, tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf_from_hf(hf_dirs["qwen2"], path, pre="made-up-pre")
    with pytest.raises(ValueError, match=r"'made-up-pre' is not supported; supported:.*smollm"):
        load_gguf(path, progress=False)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_gguf(tmp_path / "absent.gguf", progress=False)


def test_garbled_and_truncated_files(hf_dirs, tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        load_gguf(garbage, progress=False)

    whole = tmp_path / "m.gguf"
    write_gguf_from_hf(hf_dirs["qwen2"], whole)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[:-5000])
    with pytest.raises(ValueError, match="truncated|not a readable GGUF"):
        load_gguf(cut, progress=False)


# --------------------------------------------------------------------------------------- tokenizer

def _assert_same_tokenizer(ours, reference):
    assert isinstance(ours, PreTrainedTokenizerFast)
    for text in STRINGS:
        ids = reference(text).input_ids
        assert ours(text).input_ids == ids, text
        assert ours.decode(ids) == reference.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "chat_template"):
        assert getattr(ours, attr) == getattr(reference, attr), attr
    assert len(ours) == len(reference)


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2"])
def test_byte_level_tokenizer_matches_transformers(pre, hf_dirs, tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf_from_hf(hf_dirs["qwen2"], path, pre=pre)
    loaded = load_gguf(path, progress=False)
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    _assert_same_tokenizer(loaded.tokenizer, reference)
    # special tokens stay whole, user-defined ones too
    im_start = loaded.tokenizer.convert_tokens_to_ids("<|im_start|>")
    think = loaded.tokenizer.convert_tokens_to_ids("<think>")
    assert loaded.tokenizer("<|im_start|><think>").input_ids == [im_start, think]
    assert loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    assert loaded.eos_token_ids == (loaded.tokenizer.convert_tokens_to_ids("<|im_end|>"),)


def _sentencepiece_meta(vocab_size):
    """A llama-style SentencePiece BPE vocabulary as llama.cpp stores it: <unk>, <s>, </s>, 256 byte
    tokens, then pieces with scores (higher = merged earlier), and no merges."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size - 259))
    by_rank = sorted(trained.get_vocab().items(), key=lambda kv: kv[1])
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, CONTROL, CONTROL] + [6] * 256
    scores = [0.0] * len(tokens)
    for piece, rank in by_rank[:vocab_size - len(tokens)]:
        tokens.append(piece)
        types.append(NORMAL)
        scores.append(-float(rank))
    return {"model": "llama", "tokens": tokens, "token_types": types, "scores": scores,
            "bos": 1, "eos": 2, "unk": 0, "add_space_prefix": True, "chat_template": CHAT_TEMPLATE}


def test_sentencepiece_tokenizer_matches_transformers(hf_dirs, tmp_path):
    path = tmp_path / "m.gguf"
    # only the tokenizer is under test, so its vocabulary can outgrow the tiny model's embedding
    meta = _sentencepiece_meta(700)
    assert any(len(t) > 3 and t.startswith("▁") for t in meta["tokens"])  # real merges to order
    write_gguf_from_hf(hf_dirs["llama"], path, tokenizer_meta=meta)
    loaded = load_gguf(path, progress=False)
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    _assert_same_tokenizer(loaded.tokenizer, reference)
    ids = loaded.tokenizer("hello Ж").input_ids
    assert ids[0] == 1  # BOS by default for SentencePiece vocabularies
    assert "<0xD0>" in loaded.tokenizer.convert_ids_to_tokens(ids)  # byte fallback: Ж is not in the corpus


# ----------------------------------------------------------------------------- the default model

@pytest.fixture(scope="session")
def default_gguf():
    from jaxserve.weights.default_model import default_model_path

    return default_model_path(progress=False)


@pytest.fixture(scope="session")
def default_loaded(default_gguf):
    return load_gguf(default_gguf, progress=False)


@pytest.fixture(scope="session")
def transformers_default(default_gguf, default_loaded):
    """transformers' own GGUF loading of the same file: its config and dequantized state dict."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):  # only its parameter names are used, to map GGUF names
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.for_model(**default_loaded.hf_config))
    return load_gguf_checkpoint(str(default_gguf), return_tensors=True, model_to_load=skeleton)


def test_default_model_config_matches_models_md(default_loaded, transformers_default):
    config = default_loaded.hf_config
    expected = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
                "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152, "head_dim": 64,
                "tie_word_embeddings": True, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
                "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 2, "rope_scaling": None}
    assert {k: config[k] for k in expected} == expected
    reference = transformers_default["config"]
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "tie_word_embeddings", "max_position_embeddings"):
        assert config[key] == reference[key], key
    assert default_loaded.eos_token_ids == (2,)
    assert "lm_head.weight" not in default_loaded.tensors


def test_default_model_tensors_match_transformers(default_loaded, transformers_default):
    reference = transformers_default["tensors"]
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.0.self_attn.k_proj.weight", "model.layers.29.self_attn.q_proj.weight",
                 "model.layers.29.self_attn.k_proj.weight", "model.layers.7.mlp.down_proj.weight",
                 "model.norm.weight"):
        np.testing.assert_allclose(default_loaded.tensors[name], reference[name].numpy(), rtol=0, atol=1e-6,
                                   err_msg=name)


def test_default_model_tokenizer_matches_transformers(default_gguf, default_loaded):
    reference = AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)
    _assert_same_tokenizer(default_loaded.tokenizer, reference)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert (default_loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            == reference.apply_chat_template(messages, add_generation_prompt=True))
