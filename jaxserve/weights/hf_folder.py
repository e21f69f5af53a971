"""Read a transformers model folder: config.json, *.safetensors (single or sharded), tokenizer, generation config."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What every loader hands to the engine: HF config dict, HF-named tensors, tokenizer, EOS ids."""

    hf_config: dict
    tensors: Mapping  # name -> numpy array (or QArray: weights/prequantized.py, gguf_file.py)
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


_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class LazyTensors(Mapping):
    """The folder's tensors by name, each a read-only view of its memory-mapped file until asked for: the loader
    converts, quantizes and places one tensor at a time, so host memory holds about one float tensor beyond what
    is kept. (Read here rather than by safetensors' numpy API, which has no float8 types.)"""

    def __init__(self, files: list[pathlib.Path], progress: bool):
        self._where: dict[str, tuple[np.memmap, dict]] = {}
        for f in tqdm(files, desc="Indexing safetensors", unit="file", disable=not progress):
            with open(f, "rb") as opened:
                size = int.from_bytes(opened.read(8), "little")
                header = json.loads(opened.read(size))
            header.pop("__metadata__", None)
            data = np.memmap(f, np.uint8, mode="r", offset=8 + size)
            self._where.update((name, (data, info)) for name, info in header.items())

    def __getitem__(self, name: str) -> np.ndarray:
        data, info = self._where[name]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"tensor {name}: safetensors dtype {info['dtype']} is not supported")
        start, end = info["data_offsets"]
        return data[start:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])

    def __contains__(self, name) -> bool:
        return name in self._where

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
