"""Resolve a model argument (None, a .gguf file, an HF folder, a hub id) and load it onto devices."""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time

import jax
import jax.numpy as jnp

import kernels_cpu
from jaxserve import models
from jaxserve.models.base import count_params
from jaxserve.models.config import ModelConfig
from jaxserve.parallel import sharding
from jaxserve.quantization import qarray
from jaxserve.quantization.schemes import DEFAULT_INT4_GROUP, SCHEMES, WeightQuantization, check_backend
from jaxserve.weights import prequantized
from jaxserve.weights.hf_folder import Checkpoint, load_hf_folder

log = logging.getLogger("jaxserve")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    name: str
    cfg: ModelConfig
    params: object  # the model family's params pytree (jaxserve.models)
    tokenizer: object
    eos_token_ids: tuple[int, ...]
    dtype: jnp.dtype
    generation_config: dict = dataclasses.field(default_factory=dict)  # sampling defaults (hf_folder.Checkpoint)


def resolve_dtype(dtype: str | None) -> jnp.dtype:
    """"auto": float32 on CPU (no bf16 instructions here, f32 measured 2.5-3x faster), bfloat16 on TPU/GPU."""
    if dtype in (None, "auto"):
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    names = {"float32": jnp.float32, "float": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "half": jnp.float16}
    if dtype not in names:
        raise ValueError(f"unsupported dtype {dtype!r}; choose auto, {', '.join(names)}")
    return jnp.dtype(names[dtype])


def read_checkpoint(model: str | None, *, keep=lambda stored: False,
                    progress: bool = True) -> tuple[str, Checkpoint]:
    """Returns (display name, checkpoint). None means the embedded default model. keep(stored): whether a checkpoint
    stored quantized (stored: "gguf", "fp8", "awq", "gptq") keeps its matrices as QArrays, else they come as
    float32; for a GGUF it may also be a function of each tensor's name and type."""
    if model is None:
        from jaxserve.weights import default_model

        path = default_model.default_model_path(progress=progress)
        ckpt = _load_gguf(path, keep("gguf"), progress)  # a GGUF carries no generation config: the model card's
        return default_model.DEFAULT_MODEL_NAME, dataclasses.replace(ckpt, generation_config=default_model.SAMPLING)
    path = pathlib.Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; pass a .gguf file or a transformers model folder")
        return path.stem, _load_gguf(path, keep("gguf"), progress)
    if path.is_dir():
        return path.name, _quantized_view(load_hf_folder(path, progress=progress), keep)
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return model, _quantized_view(load_hf_folder(_download_from_hub(model), progress=progress), keep)
    raise ValueError(f"model {model!r} is neither a .gguf file, a model folder, nor a hub id like 'org/name'")


def _quantized_view(ckpt: Checkpoint, keep) -> Checkpoint:
    stored = prequantized.stored_quantization(ckpt.hf_config)
    if stored is None:
        keep(None)  # it still refuses a format the checkpoint is not in
        return ckpt
    return dataclasses.replace(ckpt, tensors=prequantized.QuantizedTensors(ckpt.tensors, ckpt.hf_config, keep(stored)))


def _load_gguf(path: pathlib.Path, keep_quantized, progress: bool) -> Checkpoint:
    from jaxserve.weights import gguf_file  # the gguf package is only needed for .gguf files

    g = gguf_file.load_gguf(path, keep_quantized=keep_quantized, progress=progress)
    return Checkpoint(g.hf_config, g.tensors, g.tokenizer, g.eos_token_ids)


def _download_from_hub(repo_id: str) -> pathlib.Path:
    # Only the files the HF-folder loader reads; this needs network access to the hub, which this
    # project's build machines do not have, so this path is untested here.
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja"]
    try:
        return pathlib.Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise ValueError(f"could not download {repo_id!r} from the Hugging Face hub ({e}); "
                         "pass a local model folder or .gguf file instead") from e


STORED = ("gguf", "awq", "gptq")  # --quantization values that name a checkpoint's own format


def load_model(model: str | None = None, *, dtype: str | None = "auto", mesh=None, quantization: str | None = "auto",
               quantization_group_size: int = DEFAULT_INT4_GROUP, quantize_lm_head: bool = False,
               progress: bool = True) -> LoadedModel:
    """mesh: a jax.sharding.Mesh to shard the weights over (see sharding.py); None puts them on one device.

    quantization, for a checkpoint stored quantized (GGUF, or transformers fp8 / AWQ / GPTQ): "auto" keeps its
    matrices as stored (QArrays) on TPU and GPU; on CPU it keeps a GGUF's matrices that the C++ kernels multiply
    from their codes (gguf_blocks.kept_on_cpu) where those are built, and dequantizes the rest to `dtype` (XLA:CPU
    does not fuse a dequantization into its dot); "none" dequantizes them; "gguf", "awq", "gptq" keep them and
    fail for a checkpoint of another format. "int8", "int4" (groups of quantization_group_size) or "fp8" quantize the decoder layers' matrices tensor
    by tensor as they are placed (a quantized checkpoint's dequantized first, except an fp8 checkpoint under "fp8",
    kept as stored), and with quantize_lm_head the LM head and the embeddings too."""
    start = time.perf_counter()
    mesh = mesh or sharding.make_mesh(1)
    device = mesh.devices.flat[0]
    if quantization not in (None, "auto", "none", *STORED, *SCHEMES):
        raise ValueError(f"unknown quantization {quantization!r}; choose auto, none, {', '.join(STORED + SCHEMES)}")
    quantize = None
    if quantization in SCHEMES:
        quantize = WeightQuantization(quantization, quantization_group_size, lm_head=quantize_lm_head)
        check_backend(quantization, device.platform, device.device_kind, getattr(device, "compute_capability", None))

    def keep(stored: str | None):
        if quantization in STORED and stored != quantization:
            raise ValueError(f"--quantization {quantization}: the checkpoint is {stored or 'not quantized'}")
        if quantization in (None, "auto"):
            if device.platform != "cpu":
                return True
            if stored != "gguf" or not kernels_cpu.enabled(kernels_cpu.quantized_linear.PACKED4):
                return False
            from jaxserve.quantization import gguf_blocks  # (imports the gguf package)
            return gguf_blocks.kept_on_cpu
        return stored == quantization

    name, ckpt = read_checkpoint(model, keep=keep, progress=progress)
    cfg = ModelConfig.from_hf(ckpt.hf_config)
    jdtype = resolve_dtype(dtype)
    params = models.family(cfg.model_type).params_from_hf(ckpt.tensors, cfg, jdtype,
                                                          put=sharding.param_put(mesh, cfg, quantize))
    cfg = sharding.placed(mesh, cfg)
    jax.block_until_ready(params)
    log.info("loaded %s: %s, %.1fM parameters, %s, weights %.0f MB (%s), %.1f s", name, cfg.model_type,
             count_params(params) / 1e6, jdtype.name, qarray.nbytes(params) / 1e6, quantization or "auto",
             time.perf_counter() - start)
    return LoadedModel(name, cfg, params, ckpt.tokenizer, ckpt.eos_token_ids, jdtype, dict(ckpt.generation_config))
