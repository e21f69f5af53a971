"""Placement of weights, KV cache and batches on a device mesh, from one table of logical-axis rules.

Tensor parallelism is Megatron-style (q/k/v/gate/up split by output columns, o/down by input rows, embedding and LM
head by vocabulary), over every device of the mesh; the step's token and row arrays are replicated. (A `data` axis
that replicated weights, cache and attention was removed: it was not data parallelism.) Every array names its dimensions
with logical axes; `RULES` maps those to mesh axes. A dimension that the mesh axis does not divide evenly
(e.g. SmolLM2's 3 kv heads or 9 query heads on 2 or 4 devices) is replicated instead, so any model runs on
any mesh; XLA inserts the collectives. Where the model axis is a multiple of the kv heads (Llama-3-8B's 8 on 16
devices), each kv head is instead repeated model/kv times at load (`kv_head_repeats`): every device then holds
and attends with the one kv head its query heads read, not all of them.

Mixtures of experts: the mesh has a second axis, `expert`, and tensor parallelism spans both (`TENSOR`). As in vLLM,
--enable-expert-parallel puts the experts over the tensor-parallel devices: make_mesh then lays those devices
along `expert` (shape (tp, 1)), so attention and every other tensor-parallel weight still splits tp ways while
each device holds num_experts / tp whole experts; without it the devices lie along `model` (shape (1, tp)) and
each expert's intermediate columns split tp ways, as a dense MLP's do. A rule's mesh axes that the mesh lacks or
has of size 1 are dropped, so every spec names one mesh axis at most.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxserve.models.config import ModelConfig
from jaxserve.models.base import cache_shape
from jaxserve.quantization.qarray import QArray, common_form, is_quantized

TENSOR = ("expert", "model")  # the tensor-parallel devices: all of the mesh (one of the two axes has size 1)
RULES = {
    "vocab": TENSOR,
    "embed": None,
    "q_heads": TENSOR,
    "kv_heads": TENSOR,
    "mlp": TENSOR,
    "qkv_heads": TENSOR,  # fused q/k/v columns, split only in whole per-device groups (ModelConfig.qkv_groups)
    "gate_up": TENSOR,  # fused gate/up columns, likewise (ModelConfig.mlp_groups)
    "head_dim": None,
    "pages": None,
    "page": None,
    "experts": "expert",  # whole experts per device (--enable-expert-parallel)
    "expert_mlp": "model",  # each expert's intermediate columns (tensor parallel)
}

# Logical axes of each params field (see model.Layer / model.Params for the shapes).
PARAM_AXES = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "final_norm": ("embed",),
    "attn_norm": ("embed",),
    "mlp_norm": ("embed",),
    "post_attn_norm": ("embed",),  # Gemma
    "post_mlp_norm": ("embed",),  # Gemma
    "wqkv": ("embed", "qkv_heads"),
    "wo": ("q_heads", "embed"),
    "bqkv": ("qkv_heads",),
    "q_norm": ("head_dim",),
    "k_norm": ("head_dim",),
    "w_gate_up": ("embed", "gate_up"),
    "w_down": ("mlp", "embed"),
    "router": ("embed", None),  # [hidden, experts]: small, replicated
    "w_gate_exps": ("experts", "embed", "expert_mlp"),
    "w_up_exps": ("experts", "embed", "expert_mlp"),
    "w_down_exps": ("experts", "expert_mlp", "embed"),
}
CACHE_AXES = ("pages", "page", "kv_heads", "head_dim")  # kv_heads: the combined (K, V) pairs axis


def make_mesh(tensor_parallel_size: int = 1, devices=None, enable_expert_parallel: bool = False) -> Mesh:
    """The ("expert", "model") mesh of the first tensor_parallel_size devices, laid along `model`, or along `expert`
    with enable_expert_parallel (see the module docstring). devices: default jax.devices(); `jaxserve check` passes
    a TPU topology's devices, which exist only to compile for."""
    devices = jax.devices() if devices is None else list(devices)
    if tensor_parallel_size > len(devices):
        raise ValueError(f"tensor_parallel_size {tensor_parallel_size} needs {tensor_parallel_size} devices; "
                         f"{len(devices)} available ({devices[0].platform})")
    shape = (tensor_parallel_size, 1) if enable_expert_parallel else (1, tensor_parallel_size)
    return Mesh(np.asarray(devices[:tensor_parallel_size]).reshape(shape), ("expert", "model"))


def mesh_axes(mesh: Mesh, logical: str):
    """The mesh axis a logical axis splits over on this mesh (RULES, without the axes it lacks or has of size 1):
    a name, or None."""
    rule = RULES.get(logical)
    axes = [a for a in ((rule,) if isinstance(rule, str) else rule or ()) if mesh.shape.get(a, 1) > 1]
    assert len(axes) <= 1, f"{logical!r} would split over several mesh axes {axes}"
    return axes[0] if axes else None


def tensor_parallel_size(mesh: Mesh) -> int:
    """How many ways the tensor-parallel dimensions split (heads, MLP columns, vocabulary)."""
    return int(np.prod([mesh.shape.get(a, 1) for a in TENSOR]))


def sharding_for(mesh: Mesh, axes: tuple, shape: tuple, cfg: ModelConfig | None = None) -> NamedSharding:
    """NamedSharding for an array whose dimensions have logical `axes`; uneven splits are replicated.

    Head-carrying dimensions are split only on whole heads (so a device never holds part of a head).
    """
    spec = []
    for axis, size in zip(axes, shape):
        mesh_axis = mesh_axes(mesh, axis)
        n = mesh.shape[mesh_axis] if mesh_axis else 1
        units = size
        if cfg is not None and axis == "q_heads":
            units = cfg.num_heads
        elif cfg is not None and axis == "kv_heads":
            units = cfg.num_kv_heads
        elif cfg is not None and axis == "qkv_heads":
            units = cfg.qkv_groups
        elif cfg is not None and axis == "gate_up":
            units = cfg.mlp_groups
        spec.append(mesh_axis if mesh_axis and units % n == 0 and size % n == 0 else None)
    return NamedSharding(mesh, PartitionSpec(*spec))


def param_sharding(mesh: Mesh, cfg: ModelConfig, name: str, shape: tuple) -> NamedSharding:
    """Where the params field `name` of this shape lives, by PARAM_AXES."""
    return sharding_for(mesh, PARAM_AXES[name], shape, cfg)


def kv_head_repeats(mesh: Mesh, cfg: ModelConfig) -> int:
    """How many copies of each kv head make the kv heads split evenly over the model axis: model / kv heads when
    that is a whole number above 1 and the query heads split evenly too (each device's query heads then read
    exactly its copy), else 1."""
    n = tensor_parallel_size(mesh)
    kv = cfg.num_kv_heads
    return n // kv if n > kv and n % kv == 0 and cfg.num_heads % n == 0 else 1


def placed(mesh: Mesh, cfg: ModelConfig) -> ModelConfig:
    """The configuration the weights compute with once placed on `mesh` (cfg: the checkpoint's): kv heads repeated
    by kv_head_repeats, and the fused weights in one group per device where their heads (q and kv) or columns
    (gate/up) split evenly over the model axis, else in one group (then replicated)."""
    n = tensor_parallel_size(mesh)
    kv = cfg.num_kv_heads * kv_head_repeats(mesh, cfg)
    return dataclasses.replace(cfg, num_kv_heads=kv,
                               qkv_groups=n if cfg.num_heads % n == 0 and kv % n == 0 else 1,
                               mlp_groups=n if cfg.intermediate_size % n == 0 else 1)


QKV_FIELDS = ("wqkv", "bqkv")  # fused from q, k, v
FUSED_FIELDS = QKV_FIELDS + ("w_gate_up",)  # fields made of several checkpoint tensors


def fuse(parts: tuple[np.ndarray, ...], name: str, cfg: ModelConfig, to: ModelConfig) -> np.ndarray:
    """A fused field from its parts (q, k, v or gate, up; output columns last), as `to` (placed(mesh, cfg)) reads
    it: k and v heads repeated (k0 k0 k1 k1 ...: query head h still reads original kv head h // group), then the
    columns in `to`'s groups, each holding its device's share of every part."""
    if name in QKV_FIELDS:
        q, k, v = parts
        repeats = to.num_kv_heads // cfg.num_kv_heads

        def repeat(x):
            heads = x.reshape(x.shape[:-1] + (cfg.num_kv_heads, cfg.head_dim))
            return np.repeat(heads, repeats, axis=-2).reshape(x.shape[:-1] + (-1,))

        parts, groups = (q, repeat(k), repeat(v)), to.qkv_groups
    else:
        groups = to.mlp_groups
    grouped = [p.reshape(p.shape[:-1] + (groups, -1)) for p in parts]
    return np.concatenate(grouped, axis=-1).reshape(parts[0].shape[:-1] + (-1,))


def fused_shape(parts, name: str, cfg: ModelConfig, to: ModelConfig) -> tuple[int, ...]:
    """fuse()'s output shape, without touching the parts' data (`jaxserve check` fuses abstract weights)."""
    columns = fuse(tuple(np.zeros(p.shape[-1:], np.int8) for p in parts), name, cfg, to).shape[-1]
    return tuple(parts[0].shape[:-1]) + (columns,)


def split_fused(array: np.ndarray, name: str, cfg: ModelConfig) -> tuple[np.ndarray, ...]:
    """A fused field in one group (as loaded on one device) back into its parts."""
    if name in QKV_FIELDS:
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return tuple(np.split(array, [q, q + kv], axis=-1))
    return tuple(np.split(array, 2, axis=-1))


def param_put(mesh: Mesh, cfg: ModelConfig, quantize=None):
    """A `put(array, field_name)` for `params_from_hf` that shards each field by PARAM_AXES; fused fields come
    as tuples of parts and are fused for the placed configuration (cfg: the checkpoint's; the model then runs with
    `placed(mesh, cfg)`). quantize(array, name): applied to each (fused) field before it is placed
    (quantization.schemes.WeightQuantization). A QArray's values, scales and offsets are fused and placed alike: each
    has the field's logical axes (its groups run along one of them)."""
    to = placed(mesh, cfg)

    def place(array, name):
        if isinstance(array, tuple):
            parts = common_form(tuple(_host(a) for a in array))
            array = jax.tree.map(lambda *leaves: fuse(leaves, name, cfg, to), *parts)
        array = quantize(_host(array), name) if quantize else _host(array)
        return jax.tree.map(lambda a: put(a, param_sharding(mesh, to, name, a.shape)), array)

    return place


def _host(array):
    return array if isinstance(array, QArray) else np.asarray(array)


def cache_sharding(mesh: Mesh, cfg: ModelConfig, shape: tuple) -> NamedSharding:
    """A cache array's placement (a quantized cache's scales, [pages, page_size, kv_heads], by the first three)."""
    return sharding_for(mesh, CACHE_AXES[:len(shape)], shape, cfg)


def layer_cache_sharding(mesh: Mesh, cfg: ModelConfig, layer):
    """cache_sharding for each array of one layer's cache entry (base.layer_cache)."""
    return jax.tree.map(lambda s: cache_sharding(mesh, cfg, s.shape), layer)


def kv_heads_per_device(mesh: Mesh, cfg: ModelConfig) -> int:
    """The kv heads each device holds of the cache (all of them where the model axis does not split them)."""
    shape = cache_shape(cfg, 1, 1)
    return cache_sharding(mesh, cfg, shape).shard_shape(shape)[2] // 2


def by_vocab(mesh: Mesh, vocab: int) -> NamedSharding:
    """[rows, vocab] arrays (logits, the sampler's per-token rows) split over the vocabulary as the LM head's
    output is (replicated where the model axis does not divide it)."""
    return sharding_for(mesh, ("rows", "vocab"), (1, vocab))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def put(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Host array -> a global array, each process filling only its own devices (works across processes)."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def put_tree(tree, shardings):
    """`put` over a pytree. In a single process one batched device_put does the same, faster (it is on every
    step's path)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    return jax.tree.map(put, tree, shardings)


def host(array: jax.Array) -> np.ndarray:
    """A replicated global array's value, read from this process's own copy."""
    return np.asarray(array.addressable_shards[0].data)


def shard_params(params, mesh: Mesh, cfg: ModelConfig):
    """Re-places a params pytree loaded on one device (cfg: its configuration, one group per fused field) on `mesh`
    by the same rules as loading does. Returns the params and the configuration they compute with (placed)."""
    assert cfg.qkv_groups == cfg.mlp_groups == 1, "re-placing params that are already grouped for a mesh"
    put = param_put(mesh, cfg)

    def split(x, name):  # each leaf (a QArray's codes, scales, offsets alike) split into the same parts
        count = 3 if name in QKV_FIELDS else 2
        return tuple(jax.tree.map(lambda a, i=i: split_fused(np.asarray(a), name, cfg)[i], x) for i in range(count))

    def place(path, x):
        name = path[-1].name
        return put(split(x, name) if name in FUSED_FIELDS else x, name)

    return jax.tree_util.tree_map_with_path(place, params, is_leaf=is_quantized), placed(mesh, cfg)
