"""Drive model.forward by hand through the paged cache: ragged prefill of several sequences, then decode steps."""

from __future__ import annotations

import jax
import numpy as np

from jaxserve import models
from jaxserve.models import base as model_base
from jaxserve.models.attention import resolve_backend


def run_logits(loaded, prompts: list[list[int]], decode_steps: int, page_size: int = 4, backend: str = "reference",
               feed: list[list[int]] | None = None, mesh=None, kv_cache_dtype: str = "auto"):
    """Prefill all prompts in one ragged batch, then `decode_steps` steps feeding greedy tokens (or `feed`).

    Returns (logits [steps + 1, S, vocab], tokens [S, steps + 1]) where tokens are argmaxes of each step.
    Pages are handed out in a shuffled order so block tables are non-trivial.
    """
    cfg = loaded.cfg
    max_len = max(len(p) for p in prompts) + decode_steps + 1
    pages_per_seq = -(-max_len // page_size)
    num_pages = pages_per_seq * len(prompts) + 3
    order = np.random.default_rng(0).permutation(num_pages)
    tables = order[: pages_per_seq * len(prompts)].reshape(len(prompts), pages_per_seq).astype(np.int32)
    # Ringed layers (Gemma's sliding ones): each sequence's ring in slot j, sized for the longest prompt in a step.
    ring = model_base.ring_pages(cfg, page_size, max(len(p) for p in prompts))
    rings = np.asarray(model_base.ring_tables(np.arange(len(prompts)), ring, pages_per_seq)) if ring else None
    cache = model_base.init_cache(cfg, num_pages, page_size, loaded.dtype,
                                  code_dtype=model_base.kv_code_dtype(kv_cache_dtype), ring_pages=ring * len(prompts))
    attn = resolve_backend(backend, mesh)
    step = jax.jit(lambda p, c, b: models.forward(p, c, b, cfg, attn))
    seqs = [list(p) for p in prompts]
    computed = [0] * len(prompts)
    all_logits = []
    for i in range(decode_steps + 1):
        chunks = [s[c:] for s, c in zip(seqs, computed)]
        batch = _batch(chunks, computed, tables, page_size, rings)
        logits, cache = step(loaded.params, cache, batch)
        logits = np.asarray(logits)
        all_logits.append(logits)
        for j, s in enumerate(seqs):
            computed[j] = len(s)
            s.append(int(feed[j][i]) if feed is not None else int(logits[j].argmax()))
    tokens = np.array([s[len(p):] for s, p in zip(seqs, prompts)])
    return np.stack(all_logits), tokens


def _batch(chunks, starts, tables, page_size, rings=None):
    ids, pos, rows, cu, last = [], [], [], [0], []
    for j, (chunk, start) in enumerate(zip(chunks, starts)):
        ids += chunk
        pos += range(start, start + len(chunk))
        rows += [j] * len(chunk)
        cu.append(cu[-1] + len(chunk))
        last.append(cu[-1] - 1)
    kv_lens = [s + len(c) for s, c in zip(starts, chunks)]
    i32 = lambda x: np.asarray(x, np.int32)  # noqa: E731
    pos, rows = i32(pos), i32(rows)
    slots = lambda t: t[rows, pos // page_size] * page_size + pos % page_size  # noqa: E731
    ring = {} if rings is None else dict(ring_slot_mapping=slots(rings), ring_block_tables=rings)
    return model_base.Batch(i32(ids), pos, slots(tables), i32(kv_lens), tables, i32(cu), i32([len(chunks)]),
                            i32(last), **ring)
