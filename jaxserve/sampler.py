"""Token sampling on device, vectorized over the batch with per-request parameters.

Each request's random stream is a function of its own seed and the index of the token being sampled,
so its samples do not depend on what else shares the batch. Sampling uses the Gumbel-max trick
(argmax of logits + Gumbel noise draws from softmax(logits)), which needs no sort; the sort that top-k and
top-p need runs only when some request in the batch asks for them, and a batch that is all greedy takes
the argmax alone.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.sequence import Sequence


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingBatch:
    temperature: jax.Array  # [S] float32, 0 = greedy
    top_k: jax.Array  # [S] int32, 0 = disabled
    top_p: jax.Array  # [S] float32
    min_p: jax.Array  # [S] float32
    seed: jax.Array  # [S, 2] uint32: the request seed's high and low words
    sample_index: jax.Array  # [S] int32: index of the token being sampled in the sequence's output

    @classmethod
    def build(cls, seqs: list[Sequence], size: int) -> "SamplingBatch":
        """Host-side arrays for `seqs`, padded to `size` rows with greedy defaults."""
        t = np.zeros(size, np.float32)
        k = np.zeros(size, np.int32)
        p = np.ones(size, np.float32)
        m = np.zeros(size, np.float32)
        seed = np.zeros((size, 2), np.uint32)
        idx = np.zeros(size, np.int32)
        for i, s in enumerate(seqs):
            sp = s.params
            t[i], k[i], p[i], m[i] = sp.temperature, sp.top_k, sp.top_p, sp.min_p
            seed[i] = (s.seed >> 32) & 0xFFFFFFFF, s.seed & 0xFFFFFFFF
            idx[i] = s.num_output_tokens
        return cls(t, k, p, m, seed, idx)


def _row_keys(seed, sample_index):
    def one(words, index):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), words[0]), words[1])
        return jax.random.fold_in(key, index)

    return jax.vmap(one)(seed, sample_index)


def _top_k_top_p(logits, top_k, top_p):
    """Masks logits outside each row's top-k, then outside the smallest set with probability >= top_p."""
    vocab = logits.shape[-1]
    ordered = -jnp.sort(-logits, axis=-1)  # [S, V] descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    ranks = jnp.arange(vocab)[None, :]
    ordered = jnp.where(ranks < k[:, None], ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < top_p[:, None]) & (ranks < k[:, None])
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample(logits, sp: SamplingBatch):
    """logits: [S, V] float32 -> token ids [S] int32."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw():
        temp = jnp.where(sp.temperature > 0, sp.temperature, 1.0)
        scaled = logits / temp[:, None]
        probs = jax.nn.softmax(scaled, axis=-1)
        scaled = jnp.where(probs >= sp.min_p[:, None] * probs.max(-1, keepdims=True), scaled, -jnp.inf)
        needs_sort = jnp.any((sp.top_k > 0) | (sp.top_p < 1))
        scaled = jax.lax.cond(needs_sort, lambda x: _top_k_top_p(x, sp.top_k, sp.top_p), lambda x: x, scaled)
        keys = _row_keys(sp.seed, sp.sample_index)
        gumbel = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[-1:], jnp.float32))(keys)
        sampled = jnp.argmax(scaled + gumbel, axis=-1).astype(jnp.int32)
        return jnp.where(sp.temperature > 0, sampled, greedy)

    return jax.lax.cond(jnp.all(sp.temperature == 0), lambda: greedy, draw)
