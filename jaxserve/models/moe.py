"""Mixtures of experts (Mixtral, Qwen3-MoE): Llama's attention with a sparse MLP in each layer that has experts.

A MoE layer routes each token as transformers does: the router's logits (in the model's dtype), a softmax over all
experts in float32, the top num_experts_per_tok experts, their weights renormalized to sum 1 where norm_topk_prob
(Mixtral always). Nothing is dropped: every token reaches each of its experts, whatever the load. The T * k
(token, expert) rows are sorted by expert and go through the experts' SwiGLU MLPs as grouped matmuls (row block
i times expert i's matrices), then back to their tokens, weighted and summed.

On TPU and GPU the grouped matmuls are `jax.lax.ragged_dot`: one XLA op that XLA:GPU / XLA:TPU lower to their own
grouped kernels (the README has its H100 timings against a dense MLP). A Pallas GPU grouped matmul
(kernels_pallas/grouped_matmul.py) is the candidate against it; bench/device_check.py times both on a GPU, and none
has yet, so ragged_dot stays. XLA's partitioner splits it along the experts' columns (tensor parallel) without moving
weights, but not along the experts axis: given experts split over devices it gathers every expert's weights onto
every device each step (what `jaxserve check` showed for Qwen3-30B-A3B). So with expert parallelism the experts
run under shard_map (`_expert_parallel`): each device its own experts over the rows routed to them, then one
all-reduce of the rows. XLA:CPU expands ragged_dot into a dense dot against every expert (experts times the work,
the weights copied per call), so on CPU a loop over (tile of sorted rows, expert) pairs runs instead
(`_expert_tiles`). It reads only the experts that have rows, but XLA:CPU copies each one's matrices out of the
stack before its dot (it fuses no slice into a dot), about twice a dense MLP's weight traffic at decode: what
holds a MoE below a dense model with as many active weights on CPU (bench/moe.py); a C++ grouped matmul
(kernels_cpu) would remove it.

Expert weights are stacked [experts, in, out], gate, up and down apart, so that tensor parallelism splits each
expert's intermediate columns without regrouping a fused gate/up. With expert parallelism
(--enable-expert-parallel, sharding.py's `expert` mesh axis) each device holds num_experts / devices whole experts.

Quantized expert weights: int8 and fp8 with one scale per output column (--quantization int8 / fp8) multiply
their codes (cast to the activations' dtype) and scale each row's output by its expert's scales. Grouped int4
codes would have to be dequantized whole every step, as ragged_dot has no grouped-scale form: they are refused
at load with an error rather than dequantized silently.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxserve.models import attention, llama
from jaxserve.models.base import Batch, KVCache, rms_norm
from jaxserve.models.config import ModelConfig
from jaxserve.quantization.qarray import QArray, linear
from kernels_pallas import grouped_matmul

Params = llama.Params  # the same embedding, layers, final norm and LM head; layers are this module's Layer
final_logits = llama.final_logits


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Layer:
    # Attention fields as llama.Layer's (llama's attention block reads them).
    attn_norm: jax.Array  # [hidden]
    wqkv: jax.Array  # [hidden, (q_heads + 2 * kv_heads) * head_dim], in cfg.qkv_groups groups
    wo: jax.Array  # [q_heads * head_dim, hidden]
    mlp_norm: jax.Array  # [hidden]
    bqkv: jax.Array | None = None
    q_norm: jax.Array | None = None  # [head_dim]  (Qwen3-MoE)
    k_norm: jax.Array | None = None
    # A dense layer (Qwen3-MoE's mlp_only_layers / decoder_sparse_step): llama's MLP.
    w_gate_up: jax.Array | None = None  # [hidden, 2 * intermediate], in cfg.mlp_groups groups
    w_down: jax.Array | None = None  # [intermediate, hidden]
    # A MoE layer.
    router: jax.Array | None = None  # [hidden, experts]
    w_gate_exps: jax.Array | QArray | None = None  # [experts, hidden, moe_intermediate]
    w_up_exps: jax.Array | QArray | None = None  # [experts, hidden, moe_intermediate]
    w_down_exps: jax.Array | QArray | None = None  # [experts, moe_intermediate, hidden]


EXPERT_FIELDS = ("w_gate_exps", "w_up_exps", "w_down_exps")


def hidden_states(params: Params, cache: KVCache, batch: Batch, cfg: ModelConfig, backend: attention.Backend):
    """Returns (the last layer's output [T, hidden] for every token, before the final norm; updated cache)."""
    return llama.hidden_states(params, cache, batch, cfg, backend, decoder_layer=_decoder_layer)


@functools.partial(jax.jit, static_argnames=("cfg", "backend"))
def _decoder_layer(layer: Layer, x, cos, sin, kv_pages, batch: Batch, cfg: ModelConfig, backend: attention.Backend):
    """x [T, hidden] -> x, and kv_pages with this step's K/V written. Traced once per kind of layer (dense, MoE)."""
    x, kv_pages = llama._attention_block(layer, x, cos, sin, kv_pages, batch, cfg, backend)
    if layer.router is None:
        return llama._mlp_block(layer, x, cfg), kv_pages
    return x + moe_mlp(layer, rms_norm(x, layer.mlp_norm, cfg.rms_norm_eps), cfg, backend.expert_mesh), kv_pages


def route(h, router, cfg: ModelConfig):
    """h [T, hidden] -> (weights [T, k] float32, experts [T, k] int32): each token's top-k experts by the softmax
    of the router's logits, as transformers computes them (logits in h's dtype, softmax and top-k in float32)."""
    logits = linear(h, router)  # [T, experts]
    weights, experts = jax.lax.top_k(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), cfg.num_experts_per_tok)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights, experts


def moe_mlp(layer: Layer, h, cfg: ModelConfig, expert_mesh=None):
    """The sparse MLP of normed inputs h [T, hidden] -> [T, hidden]. expert_mesh: the mesh whose `expert` axis
    splits the experts (expert parallel), else None."""
    t, k = h.shape[0], cfg.num_experts_per_tok
    weights, experts = route(h, layer.router, cfg)
    flat = experts.reshape(-1)  # [T * k]: row r is token r // k's (r % k)-th expert
    order = jnp.argsort(flat, stable=True)  # rows grouped by expert
    sizes = jnp.zeros(cfg.num_experts, jnp.int32).at[flat].add(1)  # [experts] rows per expert
    rows = h[order // k]  # [T * k, hidden]
    weights_in = (layer.w_gate_exps, layer.w_up_exps, layer.w_down_exps)
    if expert_mesh is None or cfg.num_experts % expert_mesh.shape["expert"]:  # (uneven: the weights are replicated)
        out = expert_mlps(rows, flat[order], sizes, *weights_in)
    else:
        out = _expert_parallel(expert_mesh, rows, flat[order], sizes, *weights_in)
    out = jnp.zeros_like(out).at[order].set(out).reshape(t, k, -1)  # back to token order: [T, k, hidden]
    # Rounded where transformers rounds (bfloat16 parity): each expert's output in h's dtype, weighted (Qwen3-MoE
    # rounds its weights to h's dtype first, Mixtral keeps them in float32), the k products summed.
    if cfg.model_type != "mixtral":
        weights = weights.astype(h.dtype)
    weighted = (out.astype(jnp.float32) * weights.astype(jnp.float32)[..., None]).astype(h.dtype)
    return weighted.astype(jnp.float32).sum(axis=1).astype(h.dtype)


def expert_mlps(rows, row_experts, sizes, w_gate, w_up, w_down):
    """SwiGLU of each row by its expert: rows [R, hidden] sorted by expert, row_experts [R] their experts, sizes
    [experts] rows per expert -> [R, hidden] in rows' dtype. XLA:CPU expands a ragged_dot into a dense dot
    against every expert (experts times the work, and a copy of the weights per call): there the tiles loop runs."""
    def ragged(rows, row_experts, sizes, w_gate, w_up, w_down):
        gate = _grouped_matmul(rows, w_gate, sizes, row_experts)
        up = _grouped_matmul(rows, w_up, sizes, row_experts)
        return _grouped_matmul(jax.nn.silu(gate) * up, w_down, sizes, row_experts)

    return jax.lax.platform_dependent(rows, row_experts, sizes, w_gate, w_up, w_down, cpu=_expert_tiles,
                                      default=ragged)


def _expert_parallel(mesh, rows, row_experts, sizes, w_gate, w_up, w_down):
    """expert_mlps with the experts split over the mesh's `expert` axis: each device runs its own experts over the
    rows routed to them (a contiguous run of the sorted rows, rolled to the front), its other rows come out zero,
    and one sum over the devices assembles every row: an [R, hidden] all-reduce where XLA's partitioner, given the
    split weights and a ragged_dot, would gather every expert's weights onto every device each step."""
    num_experts = sizes.shape[0]

    def local(rows, row_experts, sizes, w_gate, w_up, w_down):
        per_device = jax.tree.leaves(w_gate)[0].shape[0]
        first = jax.lax.axis_index("expert") * per_device
        start = jnp.sum(jnp.where(jnp.arange(num_experts) < first, sizes, 0))  # this device's first row
        mine = jax.lax.dynamic_slice_in_dim(sizes, first, per_device)
        out = expert_mlps(jnp.roll(rows, -start, axis=0), jnp.roll(row_experts, -start) - first, mine,
                          w_gate, w_up, w_down)
        out = jnp.where((jnp.arange(rows.shape[0]) < mine.sum())[:, None], out, 0)
        return jax.lax.psum(jnp.roll(out, start, axis=0), "expert")

    experts = lambda w: jax.tree.map(lambda _: P("expert"), w)  # noqa: E731  (the leading axis of each leaf)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(), experts(w_gate), experts(w_up), experts(w_down)),
                         out_specs=P(), check_vma=False)(rows, row_experts, sizes, w_gate, w_up, w_down)


def _expert_tiles(rows, row_experts, sizes, w_gate, w_up, w_down):
    """expert_mlps as a loop over the steps of grouped_matmul.tile_plan (a tile of sorted rows and an expert with
    rows in it; the Pallas GPU grouped matmul runs the same steps), one expert's whole MLP per step, the tile's
    other rows masked. The empty steps are skipped, so a step reads only the weights of experts that have rows: at
    decode batch 1, k experts' weights, as a dense MLP of k * moe_intermediate reads."""
    r, hidden = rows.shape
    tile = grouped_matmul.default_block_m(r, sizes.shape[0], smallest=8)
    plan = grouped_matmul.tile_plan(sizes, r, tile)
    x = jnp.pad(rows, ((0, -(-r // tile) * tile - r), (0, 0)))  # [tiles * tile, hidden]

    def body(out, item):
        e, t, valid = item

        def run(out):
            xt = jax.lax.dynamic_slice_in_dim(x, t * tile, tile)  # [tile, hidden]
            act = jax.nn.silu(linear(xt, _expert(w_gate, e))) * linear(xt, _expert(w_up, e))
            y = linear(act, _expert(w_down, e))  # [tile, hidden]
            pos = t * tile + jnp.arange(tile)
            mine = (pos >= plan.starts[e]) & (pos < plan.ends[e])
            acc = jax.lax.dynamic_slice_in_dim(out, t * tile, tile)
            return jax.lax.dynamic_update_slice_in_dim(out, acc + jnp.where(mine[:, None], y, 0), t * tile, 0)

        return jax.lax.cond(valid, run, lambda out: out, out), None

    out, _ = jax.lax.scan(body, jnp.zeros_like(x), (plan.group, plan.tile, plan.valid))
    return out[:r]


def _expert(w, e):
    """Expert e's [in, out] matrix of stacked [experts, in, out] weights (a QArray: its codes and scales)."""
    if isinstance(w, QArray):
        return dataclasses.replace(w, values=w.values[e], scale=w.scale[e], axis=0,
                                   offset=None if w.offset is None else w.offset[e])
    return w[e]


def _grouped_matmul(rows, w, sizes, row_experts):
    """rows [R, in] @ w[expert of row] ([E, in, out]) -> [R, out] in rows' dtype (accumulated in float32)."""
    if not isinstance(w, QArray):
        return grouped_matmul.reference(rows, w, sizes)
    # One scale per (expert, output column): the codes go into the dot, the scale onto each row's output.
    y = jax.lax.ragged_dot(rows, w.values.astype(rows.dtype), sizes, preferred_element_type=jnp.float32)
    return (y * w.scale[row_experts, 0].astype(jnp.float32)).astype(rows.dtype)  # scale: [R, out]


# transformers' tensor names. In memory (and so in hf_shapes) transformers 5 holds a MoE layer's experts fused and
# stacked: mlp.experts.gate_up_proj [E, 2 * I, hidden] (gate rows, then up rows) and mlp.experts.down_proj
# [E, hidden, I]; checkpoints on disk (and transformers' own save_pretrained) keep one tensor per expert, under
# block_sparse_moe. (Mixtral) or mlp. (Qwen3-MoE). Both load.
_PER_EXPERT = {"mixtral": ("block_sparse_moe.", "w1", "w3", "w2"),
               "qwen3_moe": ("mlp.", "gate_proj", "up_proj", "down_proj")}


def params_from_hf(tensors: Mapping[str, np.ndarray | QArray], cfg: ModelConfig, dtype, put) -> Params:
    """As llama.params_from_hf (which reads every field but the MoE layers' MLPs): tensors under transformers'
    names (either spelling of the experts) and [out, in] layout; `put(array, field_name)` places each field."""
    def experts(i, p, read):
        if not cfg.moe_layers[i]:
            return None  # a dense layer: llama's MLP
        router = p + "mlp.gate.weight"
        fields = {"router": put(read(router if router in tensors else _disk_router(cfg, p), True), "router")}
        stacked = _experts(tensors, cfg, p, dtype)
        return fields | {k: _refuse_grouped(put(a, k), k) for k, a in zip(EXPERT_FIELDS, stacked)}

    # The experts may be in their on-disk spelling instead of hf_shapes' (transformers' in-memory) one.
    expected = [n for n in hf_shapes(cfg) if not _on_disk(tensors, cfg, n)]
    return llama.params_from_hf(tensors, cfg, dtype, put, layer_type=Layer, expected=expected, mlp=experts)


def _disk_router(cfg: ModelConfig, p: str) -> str:
    return p + _PER_EXPERT[cfg.model_type][0] + "gate.weight"


def _disk_expert_names(cfg: ModelConfig, p: str, e: int) -> tuple[str, str, str]:
    """Expert e's (gate, up, down) tensor names on disk."""
    block, *names = _PER_EXPERT[cfg.model_type]
    return tuple(f"{p}{block}experts.{e}.{n}.weight" for n in names)


def _on_disk(tensors, cfg: ModelConfig, name: str) -> bool:
    """Whether a fused in-memory name of hf_shapes is present in its on-disk, per-expert spelling instead."""
    p, _, rest = name.partition("mlp.")
    if rest == "gate.weight":
        return _disk_router(cfg, p) in tensors
    if rest in ("experts.gate_up_proj", "experts.down_proj"):
        return all(n in tensors for e in range(cfg.num_experts) for n in _disk_expert_names(cfg, p, e))
    return False


def _experts(tensors, cfg: ModelConfig, p: str, dtype):
    """A MoE layer's (gate, up, down) expert weights, each [experts, in, out] in dtype."""
    fused = p + "mlp.experts.gate_up_proj"
    if fused in tensors:
        gate_up, down = tensors[fused], tensors[p + "mlp.experts.down_proj"]  # [E, 2I, hidden], [E, hidden, I]
        parts = (gate_up[:, :cfg.moe_intermediate_size], gate_up[:, cfg.moe_intermediate_size:], down)
    else:
        names = [_disk_expert_names(cfg, p, e) for e in range(cfg.num_experts)]
        parts = tuple([tensors[n[j]] for n in names] for j in range(3))
    if any(isinstance(a, QArray) for part in parts for a in (part if isinstance(part, list) else [part])):
        raise ValueError("checkpoints with pre-quantized expert weights are not supported; load a float checkpoint "
                         "(and quantize it with --quantization int8 or fp8)")
    return tuple((np.stack(part) if isinstance(part, list) else np.asarray(part)).transpose(0, 2, 1)
                 .astype(dtype, copy=False) for part in parts)


def _refuse_grouped(w, name: str):
    """Expert weights quantized in groups along their input (int4) have no grouped-matmul form here (see the
    module docstring): refused rather than dequantized every step."""
    per_column = isinstance(w, QArray) and w.axis == 1 and w.group == w.shape[1]
    if isinstance(w, QArray) and not (per_column and w.bits == 8 and w.offset is None and w.zero == 0):
        raise ValueError(f"{name}: expert weights quantized in groups (int4) are not supported by the MoE grouped "
                         "matmul; use --quantization int8 or fp8 (one scale per output column) for MoE models")
    return w


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every transformers tensor this family loads for `cfg`, as transformers 5 names them in memory ([out, in]
    for linear weights; experts stacked and fused as its state_dict holds them)."""
    shapes = llama.hf_shapes(cfg)
    hidden, e, inter = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    for i in range(cfg.num_layers):
        if cfg.moe_layers[i]:
            p = f"model.layers.{i}.mlp."
            for v in ("gate_proj", "up_proj", "down_proj"):
                del shapes[p + v + ".weight"]
            shapes |= {p + "gate.weight": (e, hidden), p + "experts.gate_up_proj": (e, 2 * inter, hidden),
                       p + "experts.down_proj": (e, hidden, inter)}
    return shapes
