"""Read a transformers model folder: config.json, *.safetensors (single or sharded), tokenizer, generation config."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy so safetensors.numpy can read bf16 files)
import numpy as np
from safetensors import safe_open
from tqdm.auto import tqdm


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What every loader hands to the engine: HF config dict, HF-named tensors, tokenizer, EOS ids."""

    hf_config: dict
    tensors: dict
    tokenizer: object  # transformers.PreTrainedTokenizerBase
    eos_token_ids: tuple[int, ...]
    # Sampling defaults from generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty),
    # applied where a request leaves them out (vLLM's --generation-config auto).
    generation_config: dict = dataclasses.field(default_factory=dict)


def load_hf_folder(path, *, progress: bool = True) -> Checkpoint:
    from transformers import AutoTokenizer

    folder = pathlib.Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} has no config.json: not a transformers model folder")
    hf_config = json.loads(config_file.read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return Checkpoint(hf_config, LazyTensors(_safetensors_files(folder), progress), tokenizer,
                      _eos_ids(folder, hf_config, tokenizer),
                      _sampling_defaults(folder))


class LazyTensors(Mapping):
    """The folder's tensors by name, each read from its (memory-mapped) file when asked for: the loader converts,
    quantizes and places one tensor at a time, so host memory holds about one float tensor beyond what is kept."""

    def __init__(self, files: list[pathlib.Path], progress: bool):
        self._where = {}
        for f in tqdm(files, desc="Indexing safetensors", unit="file", disable=not progress):
            with safe_open(f, framework="np") as opened:
                self._where.update(dict.fromkeys(opened.keys(), f))

    def __getitem__(self, name: str) -> np.ndarray:
        with safe_open(self._where[name], framework="np") as opened:
            return opened.get_tensor(name)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _safetensors_files(folder: pathlib.Path) -> list[pathlib.Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} has no *.safetensors files (pytorch .bin checkpoints are not supported)")
    return files


SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _sampling_defaults(folder: pathlib.Path) -> dict:
    gen = folder / "generation_config.json"
    values = json.loads(gen.read_text()) if gen.is_file() else {}
    return {k: values[k] for k in SAMPLING_KEYS if values.get(k) is not None}


def _eos_ids(folder: pathlib.Path, hf_config: dict, tokenizer) -> tuple[int, ...]:
    # generation_config.json is what transformers' generate() stops on; it often lists several ids
    # (Llama 3: <|end_of_text|>, <|eom_id|>, <|eot_id|>).
    gen = folder / "generation_config.json"
    eos = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
    if eos is None:
        eos = hf_config.get("eos_token_id", tokenizer.eos_token_id)
    ids = eos if isinstance(eos, list) else [eos]
    return tuple(int(i) for i in ids if i is not None)
