"""Compilation bookkeeping: JAX's persistent cache, and a count of backend compilations.

The count is process-wide because that is what matters for serving: any compile after warm-up, from the
engine's step or from a stray eager op, is a latency spike. It is read through `compile_count()`.
"""

from __future__ import annotations

import os
import pathlib
import threading

import jax

_lock = threading.Lock()
_count = 0
_installed = False


def _on_event(event: str, duration: float, **_kwargs) -> None:
    global _count
    if event == "/jax/core/compile/backend_compile_duration":
        with _lock:
            _count += 1


def install_counter() -> None:
    global _installed
    with _lock:
        if not _installed:
            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _installed = True


def compile_count() -> int:
    return _count


def enable_persistent_cache(folder: str | os.PathLike | None) -> None:
    """Turns on JAX's on-disk compilation cache so a restart skips most of warm-up. None keeps it off."""
    if folder is None:
        return
    path = pathlib.Path(folder).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
