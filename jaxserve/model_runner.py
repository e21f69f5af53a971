"""Turns a scheduled step into device work: pad to a bucket, run the model, then the sampler; return token ids.

A step is two jitted calls. The model's forward pass is dispatched first and runs while the host fills the
grammar masks of constrained requests (llguidance, on the host); then the sampler runs on the logits, which stay
on the device.

Shapes come from a fixed ladder of token-count buckets (1, 8, 16, 32, ... up to the token budget); the
sequence count is tied to the token bucket (min(tokens, max_num_seqs)) so there is one compile per rung,
all done by `warm_up` before serving. The KV cache is donated to each step so XLA updates it in place.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jax.sharding import Mesh

from jaxserve import model as model_lib
from jaxserve import sharding
from jaxserve.attention import Backend
from jaxserve.config import ModelConfig
from jaxserve.sampler import (SamplerState, SamplingBatch, fill_grammar_masks, init_slot, logprobs_of, record_tokens,
                              sample, slot_rows)
from jaxserve.sequence import Sequence

# Measured with SmolLM2 on 2 CPU cores: XLA's CPU dot is a bandwidth-bound matrix-vector product for one row
# but much less efficient for a few rows, so a lone decode step takes 43 ms as one token and 84 ms padded to 8
# (2026-12-01; hosts differ: on 2026-11-24 the 8-token step took 30 ms), while 2-7 rows cost about what 8 do.
# Hence a bucket of 1 for single-stream decode, then 8, 16, 32, ...
SMALL_BUCKETS = (1, 8)


def token_buckets(max_num_batched_tokens: int) -> list[int]:
    buckets = [b for b in SMALL_BUCKETS if b < max_num_batched_tokens]
    b = SMALL_BUCKETS[-1] * 2
    while b < max_num_batched_tokens:
        buckets.append(b)
        b *= 2
    return buckets + [max_num_batched_tokens]


# Prompt logprobs take the LM head over every token of a step; rows go through it this many at a time, so the
# [rows, vocab] logits stay small (64 x 152k float32 is 39 MB) whatever the bucket.
PROMPT_LOGPROB_ROWS = 64


def _forward(params, cache, batch, cfg, backend):
    """The model step. Also returns the last layer's output of every token [T, hidden]: it stays on the device,
    read only by `_prompt_logprobs` in steps where a request asked for them."""
    hidden, cache = model_lib.hidden_states(params, cache, batch, cfg, backend)
    return model_lib.final_logits(params, hidden[batch.logits_indices], cfg), cache, hidden


def _prompt_logprobs(params, hidden, targets, cfg):
    """hidden [T, hidden], targets [T] (the prompt token that follows each fed token) -> logprobs_of's four
    arrays over T, from the raw model distribution (as vLLM's prompt logprobs)."""
    def rows(args):
        h, t = args
        return logprobs_of(model_lib.final_logits(params, h, cfg), t)

    # Each mapped row is a [1, ...] batch of one token; the unit axis is dropped after.
    out = jax.lax.map(rows, (hidden[:, None], targets[:, None]), batch_size=PROMPT_LOGPROB_ROWS)
    return jax.tree.map(lambda a: a[:, 0], out)


def _prompt_targets(scheduled: list[tuple[Sequence, int]], num_tokens: int) -> np.ndarray:
    """[num_tokens] int32: the token that follows each fed token. The last fed token's successor may not be
    sampled yet (or lie past the end): 0 there, never read."""
    targets = np.zeros(num_tokens, np.int32)
    t = 0
    for seq, n in scheduled:
        start = seq.num_computed_tokens
        following = seq.token_ids[start + 1:start + n + 1]
        targets[t:t + len(following)] = following
        t += n
    return targets


def _split_rows(scheduled: list[tuple[Sequence, int]], wanted: list[bool], arrays: list[np.ndarray]):
    """Per scheduled sequence: None, or its slice of each [T, ...] array where it wanted prompt logprobs."""
    out, t = [], 0
    for (_, n), want in zip(scheduled, wanted):
        out.append(tuple(a[t:t + n] for a in arrays) if want else None)
        t += n
    return out


def _sample(logits, sampler_state, token_ids, sampling):
    """logits: [S, V]; token_ids: [T], this step's fed tokens (counted for penalties before sampling)."""
    sampler_state = record_tokens(sampler_state, token_ids, sampling)
    tokens, logprobs = sample(logits, sampler_state, sampling)
    return tokens, logprobs, sampler_state


class ModelRunner:
    def __init__(self, cfg: ModelConfig, params, cache: model_lib.KVCache, *, backend: Backend, max_num_seqs: int,
                 max_num_batched_tokens: int, pages_per_seq: int, mesh: Mesh, eos_token_ids):
        self.cfg = cfg
        self.params = params
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.pages_per_seq = pages_per_seq
        self.eos_token_ids = eos_token_ids
        self.buckets = token_buckets(max_num_batched_tokens)
        self.mesh = mesh
        rep = sharding.replicated(mesh)
        self.sampler_state = SamplerState.zeros(max_num_seqs, cfg.vocab_size, rep)
        # Pinning the state's output shardings to its input shardings keeps every step on one compiled program.
        state_shardings = (jax.tree.map(lambda x: x.sharding, cache), jax.tree.map(lambda x: x.sharding,
                                                                                    self.sampler_state))
        # The hidden states keep whatever placement XLA gives them (None): they never leave the device.
        self._forward = jax.jit(functools.partial(_forward, cfg=cfg, backend=backend), donate_argnums=(1,),
                                out_shardings=(rep, state_shardings[0], None))
        self._prompt_logprobs = jax.jit(functools.partial(_prompt_logprobs, cfg=cfg), out_shardings=rep)
        self._sample = jax.jit(_sample, donate_argnums=(1,), out_shardings=(rep, rep, state_shardings[1]))
        self._pending = None  # (logits, placed token ids, hidden states) between a step's forward and sample calls
        # Shapes and shardings of the device state, to rebuild it after a failed step (donated buffers are gone).
        self._shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                    (cache, self.sampler_state))
        self._init_slot = jax.jit(init_slot, donate_argnums=(0,), out_shardings=state_shardings[1])
        self.device_wait_seconds = 0.0  # host time spent blocked on step results (the device still busy)
        self.peers = None  # with several processes, the leader's channel to the followers (distributed.py)

    def _sizes(self, num_tokens: int) -> tuple[int, int]:
        tokens = next(b for b in self.buckets if b >= num_tokens)
        return tokens, min(tokens, self.max_num_seqs)

    def build_batch(self, scheduled: list[tuple[Sequence, int]], pad_to: int = 0) -> tuple[model_lib.Batch, SamplingBatch]:
        """Host-side numpy arrays for one step (padding: slot -1, zero-length sequences)."""
        num_tokens, num_seqs = self._sizes(max(pad_to, sum(n for _, n in scheduled)))
        page_size = self.cache.page_size
        token_ids = np.zeros(num_tokens, np.int32)
        positions = np.zeros(num_tokens, np.int32)
        slots = np.full(num_tokens, -1, np.int32)
        kv_lens = np.zeros(num_seqs, np.int32)
        tables = np.zeros((num_seqs, self.pages_per_seq), np.int32)
        cu = np.zeros(num_seqs + 1, np.int32)
        last = np.zeros(num_seqs, np.int32)
        t = 0
        for i, (seq, n) in enumerate(scheduled):
            start = seq.num_computed_tokens
            pos = np.arange(start, start + n)
            table = np.asarray(seq.block_table, np.int32)
            token_ids[t:t + n] = seq.token_ids[start:start + n]
            positions[t:t + n] = pos
            slots[t:t + n] = table[pos // page_size] * page_size + pos % page_size
            kv_lens[i] = start + n
            tables[i, :len(table)] = table
            t += n
            cu[i + 1] = t
            last[i] = t - 1
        cu[len(scheduled) + 1:] = t
        batch = model_lib.Batch(token_ids, positions, slots, kv_lens, tables, cu,
                                np.array([len(scheduled)], np.int32), last)
        return batch, SamplingBatch.build(scheduled, num_seqs, num_tokens, self.max_num_seqs,
                                          -(-self.cfg.vocab_size // 32))

    def _place_batch(self, batch: model_lib.Batch) -> model_lib.Batch:
        """Token-level arrays split over the mesh's `data` axis, per-sequence metadata replicated; built shard by
        shard from host arrays that every process holds, so it also works across processes."""
        tok = sharding.sharding_for(self.mesh, ("tokens",), batch.token_ids.shape)
        rep = sharding.replicated(self.mesh)
        return sharding.put_tree(batch, model_lib.Batch(tok, tok, tok, rep, rep, rep, rep, rep))

    def _place_sampling(self, sampling: SamplingBatch) -> SamplingBatch:
        tok = sharding.sharding_for(self.mesh, ("tokens",), sampling.token_slot.shape)
        rep = sharding.replicated(self.mesh)
        shardings = dataclasses.replace(jax.tree.map(lambda _: rep, sampling), token_slot=tok, token_is_prompt=tok)
        return sharding.put_tree(sampling, shardings)

    # --- the only places that launch device work; with several processes the followers mirror them ---

    def _device_forward(self, batch: model_lib.Batch) -> None:
        if self.peers is not None:
            self.peers.send(("forward", batch))
        placed = self._place_batch(batch)
        logits, self.cache, hidden = self._forward(self.params, self.cache, placed)
        self._pending = (logits, placed.token_ids, hidden)

    def _device_prompt_logprobs(self, targets: np.ndarray):
        """Between a step's forward and sample: logprobs of targets [T] under each fed token's distribution."""
        if self.peers is not None:
            self.peers.send(("prompt_logprobs", targets))
        hidden = self._pending[2]
        tok = sharding.sharding_for(self.mesh, ("tokens",), targets.shape)
        return self._prompt_logprobs(self.params, hidden, sharding.put(targets, tok))

    def _device_sample(self, sampling: SamplingBatch):
        if self.peers is not None:
            self.peers.send(("sample", sampling))
        logits, token_ids, _ = self._pending
        self._pending = None
        tokens, logprobs, self.sampler_state = self._sample(logits, self.sampler_state, token_ids,
                                                            self._place_sampling(sampling))
        return tokens, logprobs

    def _device_init_slot(self, slot: int, rows: tuple[np.ndarray, ...]) -> None:
        if self.peers is not None:
            self.peers.send(("init_slot", slot, rows))
        rep = sharding.replicated(self.mesh)
        args = [sharding.put(np.asarray(x), rep) for x in (np.int32(slot), *rows)]
        self.sampler_state = self._init_slot(self.sampler_state, *args)

    def follow(self, channel) -> None:
        """Follower processes: make the leader's device calls, in its order, until it says stop."""
        calls = {"forward": self._device_forward, "prompt_logprobs": self._device_prompt_logprobs,
                 "sample": self._device_sample, "init_slot": self._device_init_slot,
                 "reset": self.reset_device_state}
        while True:
            kind, *args = channel.recv()
            if kind == "stop":
                return
            calls[kind](*args)

    def reset_device_state(self) -> None:
        """Fresh (zeroed) KV cache and sampler state with the same shapes and placement (on every process)."""
        if self.peers is not None:
            self.peers.send(("reset",))
        self.cache = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding), self._shapes[0])
        self.sampler_state = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding), self._shapes[1])
        self._pending = None

    def init_slot(self, seq: Sequence) -> None:
        self._device_init_slot(seq.slot, slot_rows(seq, self.cfg.vocab_size, self.eos_token_ids))

    def run(self, scheduled: list[tuple[Sequence, int]]):
        """Runs one step. Returns, for each scheduled sequence in order, its sampled token [n], and the logprobs
        (chosen [n], its rank [n], top ids [n, K], top logprobs [n, K]; None when no sequence asked for them);
        then the prompt logprobs: None in a step where nobody wants them (no extra device work), else per
        scheduled sequence None or the four arrays over its fed tokens [m], [m], [m, K], [m, K] (row j: the prompt
        token after its j-th fed token)."""
        for seq, _ in scheduled:
            if seq.slot_fresh:
                self.init_slot(seq)
                seq.slot_fresh = False
        batch, sampling = self.build_batch(scheduled)
        self._device_forward(batch)  # asynchronous: the masks below are computed while it runs
        wanted = [seq.needs_prompt_logprobs for seq, _ in scheduled]
        prompt = self._device_prompt_logprobs(_prompt_targets(scheduled, len(batch.token_ids))) if any(wanted) else None
        fill_grammar_masks(sampling, scheduled)
        tokens, logprobs = self._device_sample(sampling)
        n = len(scheduled)
        waited = time.perf_counter()  # from here the host only waits for the device's results
        if prompt is not None:
            prompt = _split_rows(scheduled, wanted, [sharding.host(x) for x in prompt])
        # Logprob arrays cross to the host only in steps where some sequence asked for them.
        wants = any(seq.params.logprobs is not None for seq, _ in scheduled)
        out = sharding.host(tokens)[:n], tuple(sharding.host(x)[:n] for x in logprobs) if wants else None, prompt
        self.device_wait_seconds += time.perf_counter() - waited
        return out

    def warm_up(self, progress: bool = True) -> None:
        """Compiles every bucket with an all-padding batch (it writes nothing and reads nothing)."""
        for size in tqdm(self.buckets, desc="Compiling step buckets", unit="bucket", disable=not progress):
            batch, sampling = self.build_batch([], pad_to=size)
            self._device_forward(batch)
            jax.block_until_ready(self._device_prompt_logprobs(np.zeros(size, np.int32)))
            tokens, _ = self._device_sample(sampling)
            jax.block_until_ready(tokens)
        vocab = self.cfg.vocab_size
        self._device_init_slot(0, (np.zeros(vocab, np.int32), np.zeros(vocab, np.bool_), np.zeros(vocab, np.float32),
                                   np.zeros(vocab, np.bool_)))
