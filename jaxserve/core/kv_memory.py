"""How many KV-cache pages the engine allocates, per device.

In order: an explicit page count (`num_kv_pages`); a size per device (`kv_cache_memory_gb`); where the devices
report their memory (TPU, GPU), the part of `gpu_memory_utilization` x each device's memory left after the
weights and a profiled step of the largest bucket (vLLM's rule); otherwise (CPU, which reports none)
CPU_KV_CACHE_GB per device. Whatever the source, a cache that cannot hold one sequence of max_model_len is refused
with what would fit, never silently enlarged.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxserve.models.base import ring_pages

GIB = 2**30
CPU_KV_CACHE_GB = 2.0


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    """One device's memory statistics, in bytes (jax.Device.memory_stats)."""

    limit: int  # what the allocator may use
    in_use: int
    peak: int  # the most in use at once so far

    @classmethod
    def of(cls, device) -> "DeviceMemory | None":
        stats = device.memory_stats()
        if not stats or "bytes_limit" not in stats:
            return None  # CPU devices report nothing
        in_use = stats.get("bytes_in_use", 0)
        return cls(stats["bytes_limit"], in_use, stats.get("peak_bytes_in_use", in_use))


def device_memory(devices) -> list[DeviceMemory] | None:
    """Every device's statistics, or None when some device reports none."""
    found = [DeviceMemory.of(d) for d in devices]
    return None if any(m is None for m in found) else found


def page_bytes_per_device(num_layers: int, kv_heads_per_device: int, page_size: int, head_dim: int,
                          dtype, code_dtype=None) -> int:
    """Bytes of one page (K and V of every layer) on one device, for the kv heads that device holds: values in the
    model's dtype, or codes of code_dtype plus a float32 scale per token, head and K or V (models.base.layer_cache)."""
    row = head_dim * np.dtype(dtype).itemsize if code_dtype is None else head_dim * np.dtype(code_dtype).itemsize + 4
    return 2 * num_layers * kv_heads_per_device * page_size * row


def pages_for_gb(gb: float, page_bytes: int, ring_bytes: int = 0) -> int:
    """Pool pages in gb, less the ringed layers' fixed rings (ring_bytes)."""
    return max(0, int((gb * GIB - ring_bytes) // page_bytes))


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the KV cache costs per device: layers in the shared page pool pay per page; ringed layers
    (ModelConfig.ringed: Gemma's sliding ones) hold a fixed ring of pages per sequence slot."""

    page_bytes: int  # one pool page of every pool layer
    ring_pages: int  # one slot's ring in each ringed layer (models.base.ring_pages; 0: no ringed layer)
    ring_bytes: int  # every slot's rings in every ringed layer

    @classmethod
    def of(cls, cfg, kv_heads_per_device: int, page_size: int, dtype, code_dtype, max_num_seqs: int,
           max_step_tokens: int) -> "Layout":
        pool = sum(not cfg.ringed(i) for i in range(cfg.num_layers))
        one_layer = page_bytes_per_device(1, kv_heads_per_device, page_size, cfg.head_dim, dtype, code_dtype)
        ring = ring_pages(cfg, page_size, max_step_tokens)
        return cls(pool * one_layer, ring, (cfg.num_layers - pool) * ring * max_num_seqs * one_layer)


def pages_for_utilization(before: list[DeviceMemory], after: list[DeviceMemory], utilization: float,
                          page_bytes: int, profiled_cache_bytes: int) -> int:
    """Pages that fit on every device: utilization x its limit, less what was in use before the profiled step
    (weights, and the small cache it ran with, which is then freed) and the most that step added on top
    (activations and temporaries). before/after: per device, before and after that step."""
    def fits(b: DeviceMemory, a: DeviceMemory) -> int:
        step = max(0, a.peak - b.in_use)
        free = utilization * b.limit - (b.in_use - profiled_cache_bytes) - step
        return max(0, int(free // page_bytes))

    return min(fits(b, a) for b, a in zip(before, after))


def explicit_pages(num_kv_pages: int | None, kv_cache_memory_gb: float | None, utilization: float,
                   page_bytes: int, ring_bytes: int = 0) -> tuple[int, str] | None:
    """The page count the configuration names (num_kv_pages, else kv_cache_memory_gb, which holds the rings too),
    and its source; None when it leaves the size to the devices' memory. Validates the memory settings either
    way."""
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], not {utilization}")
    if kv_cache_memory_gb is not None and kv_cache_memory_gb <= 0:
        raise ValueError(f"kv_cache_memory_gb must be positive, not {kv_cache_memory_gb}")
    if num_kv_pages:
        return num_kv_pages, "num_kv_pages"
    if kv_cache_memory_gb is not None:
        return pages_for_gb(kv_cache_memory_gb, page_bytes, ring_bytes), f"kv_cache_memory_gb {kv_cache_memory_gb:g}"
    return None


class KVCacheTooSmall(ValueError):
    """The KV cache the configuration allows cannot hold one sequence of max_model_len tokens."""


def check_fits(num_pages: int, page_size: int, max_model_len: int, page_bytes: int, source: str) -> None:
    """Raises KVCacheTooSmall, saying what would fit, when num_pages cannot hold one max_model_len sequence."""
    needed = math.ceil(max_model_len / page_size)
    if num_pages >= needed:
        return
    raise KVCacheTooSmall(
        f"the KV cache ({source}: {num_pages} pages of {page_size} tokens, {num_pages * page_bytes / GIB:.2f} GiB "
        f"per device) holds {num_pages * page_size} tokens, fewer than one sequence of max_model_len "
        f"{max_model_len} ({needed} pages, {needed * page_bytes / GIB:.2f} GiB per device). Lower --max-model-len to "
        f"at most {num_pages * page_size}, or give the cache more memory (--kv-cache-memory-gb, "
        "--gpu-memory-utilization), or use more devices (--tensor-parallel-size)")


def describe(num_pages: int, page_size: int, page_bytes: int, source: str, ring_pages: int = 0,
             ring_bytes: int = 0) -> str:
    rings = (f"; sliding-window layers: a ring of {ring_pages} pages per sequence, {ring_bytes / GIB:.2f} GiB per "
             "device" if ring_pages else "")
    return (f"KV cache: {num_pages} pages of {page_size} tokens = {num_pages * page_size} tokens, "
            f"{num_pages * page_bytes / GIB:.2f} GiB per device ({source}){rings}")
