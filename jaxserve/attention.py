"""The one place that decides which attention implementation runs.

"auto" picks the Pallas kernels on TPU and GPU and the jnp reference (compiled by XLA) on CPU; the
configuration can force any of them, which is how tests exercise each path on this CPU machine.
"""

from __future__ import annotations

import jax

import kernels_pallas
from jaxserve.config import ModelConfig

BACKENDS = ("auto", "reference", "pallas_tpu", "pallas_gpu", "pallas_interpret")


def resolve_backend(name: str = "auto") -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    return {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(jax.default_backend(), "reference")


def paged_attention(q, k, v, k_pages, v_pages, batch, cfg: ModelConfig, backend: str):
    """Write this step's K/V into the pages, then attend over them.

    q: [T, q_heads, head_dim]; k, v: [T, kv_heads, head_dim]; k_pages, v_pages: [kv_heads, pages, page_size, head_dim].
    Returns (out [T, q_heads, head_dim], k_pages, v_pages).
    """
    kernel_backend, tuning = _kernel_backend(backend)
    k_pages, v_pages = kernels_pallas.write_kv(k_pages, v_pages, k, v, batch.slot_mapping, backend=kernel_backend, **tuning)
    out = kernels_pallas.ragged_paged_attention(
        q, k_pages, v_pages, batch.kv_lens, batch.block_tables, batch.cu_q_lens, batch.num_seqs,
        sm_scale=cfg.head_dim**-0.5, sliding_window=cfg.sliding_window, backend=kernel_backend, **tuning,
    )
    return out, k_pages, v_pages


def _kernel_backend(backend: str) -> tuple[str, dict]:
    # "pallas_interpret" runs the TPU kernel in Pallas' interpreter: slow, but it checks the kernel's
    # semantics end to end through the model on a machine without accelerators.
    if backend == "pallas_interpret":
        return "pallas_tpu", {"interpret": True}
    return backend, {}
