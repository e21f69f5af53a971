"""The one place that decides which attention implementation runs.

"auto" picks the Pallas kernels on TPU and GPU and the jnp reference (compiled by XLA) on CPU, where attention over
a float32 cache goes to a C++ kernel instead (kernels_cpu/paged_attention.cc) where it is built; the
configuration can force any of them, including the Pallas kernels in Pallas' interpreter
("pallas_tpu_interpret", "pallas_gpu_interpret"), which is how tests run the kernels through the whole model
on this CPU machine. The model passes a `Backend` through without looking inside.

XLA's partitioner cannot split a Pallas call, so on a mesh of several devices the kernels run under
`shard_map`, each device attending over its own kv heads (and the query heads that read them). When the
model axis does not divide the kv heads, every device computes all heads: correct, if redundant.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import kernels_cpu
import kernels_pallas
from kernels_cpu.paged_attention import TARGET as PAGED_ATTENTION
from kernels_pallas import reference
from jaxserve.models.config import ModelConfig
from jaxserve.parallel import sharding

BACKENDS = ("auto", "reference", "pallas_tpu", "pallas_gpu", "pallas_tpu_interpret", "pallas_gpu_interpret")


@dataclasses.dataclass(frozen=True)
class Backend:
    kernel: str  # a kernels_pallas backend: reference | pallas_tpu | pallas_gpu
    interpret: bool = False
    mesh: Mesh | None = None  # set when the kernel must run under shard_map
    generation: str | None = None  # TPU generation whose block sizes the TPU kernel uses (kernels_pallas.tpu.BLOCKS)
    # The mesh when its `expert` axis splits the experts (--enable-expert-parallel): MoE layers then run their
    # experts under shard_map (models/moe.py), whatever the attention kernel.
    expert_mesh: Mesh | None = None


def resolve_backend(name: str = "auto", mesh: Mesh | None = None, device_kind: str | None = None) -> Backend:
    """device_kind: the chip compiled for (default: this process's first device)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        name = {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(jax.default_backend(), "reference")
    kernel = name.removesuffix("_interpret")
    needs_shard_map = kernel != "reference" and mesh is not None and mesh.size > 1
    generation = None
    if kernel == "pallas_tpu":
        from kernels_pallas import tpu
        generation = tpu.generation(device_kind or jax.devices()[0].device_kind)
    expert_mesh = mesh if mesh is not None and mesh.shape.get("expert", 1) > 1 else None
    return Backend(kernel, name.endswith("_interpret"), mesh if needs_shard_map else None, generation, expert_mesh)


def paged_attention(q, k, v, kv_pages, batch, cfg: ModelConfig, backend: Backend, window: int | None):
    """Write this step's K/V into the pages and attend over them (one kernel call).

    q: [T, q_heads, head_dim]; k, v: [T, kv_heads, head_dim]; kv_pages: [pages, page_size, 2 * kv_heads, head_dim],
    or a quantized cache's (codes, scales); window: the layer's sliding window (None: the whole context).
    Returns (out [T, q_heads, head_dim], kv_pages).
    """
    tuning = {"interpret": True} if backend.interpret else {}
    if backend.generation:
        tuning["generation"] = backend.generation

    options = dict(sm_scale=cfg.sm_scale, sliding_window=window, soft_cap=cfg.attn_logit_softcapping)

    def run(q, k, v, kv_pages, slots, kv_lens, tables, cu, num_seqs):
        if backend.kernel == "reference" and _cpu_kernel(q, kv_pages):
            kv_pages = reference.write_kv(kv_pages, k, v, slots)
            out = jax.lax.platform_dependent(q, kv_pages, kv_lens, tables, cu, num_seqs,
                                             cpu=functools.partial(kernels_cpu.paged_attention, **options),
                                             default=functools.partial(reference.attend, **options))
            return out, kv_pages
        return kernels_pallas.ragged_paged_attention(q, k, v, kv_pages, slots, kv_lens, tables, cu, num_seqs,
                                                     backend=backend.kernel, **options, **tuning)

    args = (q, k, v, kv_pages, batch.slot_mapping, batch.kv_lens, batch.block_tables, batch.cu_q_lens,
            batch.num_seqs)
    if backend.mesh is None:
        return run(*args)
    # Each device's slice of the combined heads axis holds whole (K, V) pairs of its own kv heads.
    # (the tensor-parallel axis: `model`, or `expert` with --enable-expert-parallel; sharding.py)
    split = cfg.num_kv_heads % sharding.tensor_parallel_size(backend.mesh) == 0
    heads = sharding.mesh_axes(backend.mesh, "kv_heads") if split else None
    tok, cache = P(None, heads, None), P(None, None, heads, None)
    if isinstance(kv_pages, tuple):  # quantized: (codes, scales [pages, page_size, 2 * kv_heads])
        cache = (cache, P(None, None, heads))
    return jax.shard_map(run, mesh=backend.mesh, in_specs=(tok, tok, tok, cache, P(), P(), P(), P(), P()),
                         out_specs=(tok, cache), check_vma=False)(*args)


def _cpu_kernel(q, kv_pages) -> bool:
    """Whether the XLA:CPU kernel (kernels_cpu/paged_attention.cc) runs this attention where it is built: a float32
    cache. It takes every batch, prefill too (where the reference, reading each kv block once per 16 tokens, is
    faster), because a token's output must not depend on what else its step holds: with the kernel for decode-shaped
    steps only, overlapping steps (which changes their shapes) changed sampled tokens."""
    return (kernels_cpu.enabled(PAGED_ATTENTION) and not isinstance(kv_pages, tuple)
            and kv_pages.dtype == jnp.float32 and q.shape[-1] % 8 == 0)
