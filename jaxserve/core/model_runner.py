"""Turns a scheduled step into device work: run the model, then the sampler; hand back token ids on the device.

A step is two jitted calls, dispatched without waiting for the step before: the model's forward pass (which
first applies the step's updates to the per-slot state, input_batch.py), then the sampler on the logits, which
stay on the device. Between the two the host reads back the previous step's tokens and processes them, so the
grammar masks of constrained sequences (filled on the host by llguidance) can be computed from every token up
to the previous step and still reach this step's sampler.

Shapes come from a fixed ladder of token-count buckets (1, 8, 16, 32, ... up to the token budget); the
sequence count is tied to the token bucket (min(tokens, max_num_seqs)) so there is one compile per rung,
all done by `warm_up` before serving. The KV cache and the per-slot state are donated to each call so XLA
updates them in place.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jax.sharding import Mesh

from jaxserve import models
from jaxserve.models.attention import Backend
from jaxserve.models.base import KVCache, ring_pages_of
from jaxserve.models.config import ModelConfig
from jaxserve.parallel import sharding
from jaxserve.core.input_batch import (FRESH, ROW_PARAMS, SAMPLES, SLOT, Scheduled, StepInput, build_step,
                                  model_batch, num_table_writes, write_tables)
from jaxserve.core.sampler import (SamplerState, admit, apply_masks, finish_rows, init_slot, logprobs_of, record_tokens,
                              rows_of, sample, slot_rows)
from jaxserve.core.sequence import Sequence

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


def _forward(params, cache, tables, state: SamplerState, step: StepInput, cfg, backend, by_vocab):
    """The model step: the step's block-table writes, the sampler-state updates that need the step's tokens (its
    fresh rows admitted, the fed output tokens counted for penalties), then the forward pass. Doing those here
    leaves the sampler only [S]-shaped inputs: one sampler program per row count, not per token bucket. Returns
    each row's logits [S, V], the cache, tables and sampler state, and the last layer's output of every token
    [T, hidden] (it stays on the device, read only by `_prompt_logprobs` in steps where a request asked)."""
    tables = write_tables(tables, step.table_writes)
    batch = model_batch(step, tables, state.last_token, cache.page_size, ring_pages_of(cache, cfg, tables.shape[0]))
    rows = step.rows
    s, n = rows.shape[0], state.counts.shape[0]
    slot = rows[:, SLOT]
    state = admit(state, jnp.where((rows[:, FRESH] == 1) & (slot >= 0), slot, n), step.row_params,
                  rows[:, ROW_PARAMS:])
    row_slot = jnp.where(slot >= 0, slot, n)
    token_slot = jnp.where(step.token_rows < s, row_slot[jnp.minimum(step.token_rows, s - 1)], n)
    state = record_tokens(state, batch.token_ids, token_slot, step.positions, by_vocab)
    family = models.family(cfg.model_type)
    hidden, cache = family.hidden_states(params, cache, batch, cfg, backend)
    logits = family.final_logits(params, hidden[batch.logits_indices], cfg)
    return logits, cache, tables, state, hidden


def _prompt_logprobs(params, hidden, targets, cfg):
    """hidden [T, hidden], targets [T] (the prompt token that follows each fed token) -> logprobs_of's four
    arrays over T, from the raw model distribution (as vLLM's prompt logprobs)."""
    def rows(args):
        h, t = args
        return logprobs_of(models.family(cfg.model_type).final_logits(params, h, cfg), t)

    # Each mapped row is a [1, ...] batch of one token; the unit axis is dropped after.
    out = jax.lax.map(rows, (hidden[:, None], targets[:, None]), batch_size=PROMPT_LOGPROB_ROWS)
    return jax.tree.map(lambda a: a[:, 0], out)


def _sample(logits, raw, state: SamplerState, rows):
    """The sampler step: draw one token per row from logits [S, V] (raw: before grammar masks, for logprobs) with
    the state the forward pass left, and keep each sampling row's token in its slot for the next step's
    placeholder. rows: the step's [S, NUM_ROW_COLS]."""
    n = state.counts.shape[0]
    slot = rows[:, SLOT]
    row_slot = jnp.where(slot >= 0, slot, n)
    tokens, logprobs = sample(logits, state, rows_of(state, jnp.minimum(row_slot, n - 1), slot >= 0), raw)
    state = finish_rows(state, row_slot, rows[:, SAMPLES] == 1, tokens)
    return tokens, logprobs, state


# Grammar masks go to the device for the constrained rows only, this many rows per call of one small program
# per bucket (more constrained rows: more calls).
MASK_ROWS = 8


@dataclasses.dataclass(frozen=True)
class StepPrograms:
    """The jitted programs of serving, one compile per bucket shape each. `jaxserve check` compiles the same
    ones with abstract inputs for a named target (jaxserve/check)."""

    forward: object  # (params, cache, tables, SamplerState, StepInput) -> (logits, cache, tables, state, hidden)
    prompt_logprobs: object  # (params, hidden [T, hidden], targets [T]) -> logprobs_of's four arrays
    masks: object  # (logits [S, V], mask rows [C], masks [C, W]) -> logits
    sample: object  # (logits, raw logits, SamplerState, rows [S, cols]) -> (tokens [S], logprobs, state)
    init_slot: object  # (SamplerState, slot, dense rows...) -> SamplerState
    write_tables: object  # (tables [slots, P], writes [E, 3]) -> tables

    @classmethod
    def build(cls, cfg: ModelConfig, backend: Backend, rep, cache_shardings, state_shardings,
              logits_sharding) -> "StepPrograms":
        """rep: the mesh's replicated sharding; logits_sharding: the logits' (split over the vocabulary, as the LM
        head computes them: no [S, V] all-gather; the sampler reduces across devices per row). Pinning the
        state's output shardings to its input shardings keeps every step on one compiled program; the hidden
        states keep whatever placement XLA gives them (None): they never leave the device. The KV cache, tables
        and sampler state are donated."""
        return cls(
            forward=jax.jit(functools.partial(_forward, cfg=cfg, backend=backend, by_vocab=logits_sharding),
                            donate_argnums=(1, 2, 3),
                            out_shardings=(logits_sharding, cache_shardings, rep, state_shardings, None)),
            prompt_logprobs=jax.jit(functools.partial(_prompt_logprobs, cfg=cfg), out_shardings=rep),
            masks=jax.jit(apply_masks, out_shardings=logits_sharding),
            sample=jax.jit(_sample, donate_argnums=(2,), out_shardings=(rep, rep, state_shardings)),
            init_slot=jax.jit(init_slot, donate_argnums=(0,), out_shardings=state_shardings),
            write_tables=jax.jit(write_tables, donate_argnums=(0,), out_shardings=rep))


def step_shardings(mesh: Mesh) -> StepInput:
    """Where each StepInput field lives: replicated (every device reads the whole step)."""
    rep = sharding.replicated(mesh)
    return StepInput(rep, rep, rep, rep, rep, rep)


def abstract(x, where) -> jax.ShapeDtypeStruct:
    """x's shape and dtype, placed by `where`: an input to compile for without its data."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where)


def compile_bucket(programs: StepPrograms, params, cache, tables, state, mesh: Mesh, num_tokens: int,
                   max_num_seqs: int, page_size: int, vocab: int, compile_one) -> list:
    """Compiles one token bucket's forward, sampler, grammar-mask and prompt-logprob programs ahead of time, from
    abstract params, cache, tables and sampler state (ShapeDtypeStructs with shardings): what `jaxserve check`
    reports on, and what warm-up compiles in parallel. compile_one(name, jitted, *args) compiles (or lowers) and
    returns (its result, its outputs' ShapeDtypeStructs, or None when it failed); the programs fed by a failed
    forward are skipped."""
    num_seqs = min(num_tokens, max_num_seqs)
    step, *_ = build_step([], num_tokens, num_seqs, num_table_writes(num_tokens, num_seqs, page_size))
    step = jax.tree.map(abstract, step, step_shardings(mesh))
    rep = sharding.replicated(mesh)
    args = (params, cache, tables, state, step)
    forward, outputs = compile_one("forward", programs.forward, *args)
    if outputs is None:
        return [forward]
    logits, _, _, state, hidden = jax.tree.map(lambda x: abstract(x, x.sharding), outputs)
    m = min(num_seqs, MASK_ROWS)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rep)
    targets = jax.ShapeDtypeStruct((num_tokens,), jnp.int32, sharding=step.token_ids.sharding)
    return [forward, compile_one("sample", programs.sample, logits, logits, state, step.rows)[0],
            compile_one("masks", programs.masks, logits, i32(m), i32(m, -(-vocab // 32)))[0],
            compile_one("prompt_logprobs", programs.prompt_logprobs, params, hidden, targets)[0]]


@dataclasses.dataclass
class Launched:
    """A dispatched step: the host's record of it and its outputs, still on the device."""

    record: Scheduled
    wanted: list[bool]  # per row: sample 0 of a request that wants prompt logprobs
    prompt: tuple | None = None  # prompt logprobs over the fed tokens (device arrays)
    tokens: jax.Array | None = None  # [S]
    logprobs: tuple | None = None


class ModelRunner:
    def __init__(self, cfg: ModelConfig, params, cache: KVCache, *, backend: Backend, max_num_seqs: int,
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
        self.tables = jnp.zeros((max_num_seqs, pages_per_seq), jnp.int32, device=rep)
        vocab = sharding.by_vocab(mesh, cfg.vocab_size)
        self.sampler_state = SamplerState.zeros(max_num_seqs, cfg.vocab_size, SamplerState.placement(rep, vocab))
        self.programs = StepPrograms.build(cfg, backend, rep, jax.tree.map(lambda x: x.sharding, cache),
                                           jax.tree.map(lambda x: x.sharding, self.sampler_state), vocab)
        self._pending = None  # (logits, hidden states, step input) between forward and sample
        self.executables = {}  # (program, tokens or rows) -> executable compiled ahead (compile_ahead)
        # Shapes and shardings of the device state, to rebuild it after a failed step (donated buffers are gone).
        self._shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                    (cache, self.tables, self.sampler_state))
        self.device_wait_seconds = 0.0  # host time spent blocked on step results (the device still busy)
        self.peers = None  # with several processes, the leader's channel to the followers (distributed.py)

    def _sizes(self, num_tokens: int) -> tuple[int, int]:
        tokens = next(b for b in self.buckets if b >= num_tokens)
        return tokens, min(tokens, self.max_num_seqs)

    def _max_writes(self, num_tokens: int) -> int:
        return num_table_writes(num_tokens, min(num_tokens, self.max_num_seqs), self.cache.page_size)

    def _place(self, step: StepInput) -> StepInput:
        """Placed by `step_shardings`, built shard by shard from host arrays that every process holds, so it also
        works across processes."""
        return sharding.put_tree(step, step_shardings(self.mesh))

    # --- the only places that launch device work; with several processes the followers mirror them ---

    def _device_write_tables(self, writes: np.ndarray) -> None:
        if self.peers is not None:
            self.peers.send(("write_tables", writes))
        self.tables = self.programs.write_tables(self.tables, sharding.put(writes, sharding.replicated(self.mesh)))

    def _device_init_slot(self, slot: int, rows: tuple[np.ndarray, ...]) -> None:
        if self.peers is not None:
            self.peers.send(("init_slot", slot, rows))
        rep = sharding.replicated(self.mesh)
        args = [sharding.put(np.asarray(x), rep) for x in (np.int32(slot), *rows)]
        self.sampler_state = self.programs.init_slot(self.sampler_state, *args)

    def _device_forward(self, step: StepInput) -> None:
        if self.peers is not None:
            self.peers.send(("forward", step))
        placed = self._place(step)
        forward = self._program("forward", step.token_ids.shape[0])
        logits, self.cache, self.tables, self.sampler_state, hidden = forward(
            self.params, self.cache, self.tables, self.sampler_state, placed)
        self._pending = (logits, hidden, placed)

    def _device_prompt_logprobs(self, targets: np.ndarray):
        """Between a step's forward and sample: logprobs of targets [T] under each fed token's distribution."""
        if self.peers is not None:
            self.peers.send(("prompt_logprobs", targets))
        hidden = self._pending[1]
        return self._program("prompt_logprobs", len(targets))(self.params, hidden,
                                                               sharding.put(targets, sharding.replicated(self.mesh)))

    def _device_sample(self, mask_rows: np.ndarray | None = None, masks: np.ndarray | None = None):
        """mask_rows [C], masks [C, W]: the grammar masks of the constrained rows (None: no row is), C a multiple
        of min(rows, MASK_ROWS), applied that many at a time."""
        if self.peers is not None:
            self.peers.send(("sample",) if masks is None else ("sample", mask_rows, masks))
        logits, _, placed = self._pending
        self._pending = None
        raw = logits
        if masks is not None:
            rep = sharding.replicated(self.mesh)
            m = min(logits.shape[0], MASK_ROWS)
            for i in range(0, len(masks), m):
                logits = self._program("masks", logits.shape[0])(logits, sharding.put(mask_rows[i:i + m], rep),
                                                                  sharding.put(masks[i:i + m], rep))
        tokens, logprobs, self.sampler_state = self._program("sample", logits.shape[0])(logits, raw, self.sampler_state,
                                                                                        placed.rows)
        return tokens, logprobs

    def follow(self, channel) -> None:
        """Follower processes: make the leader's device calls, in its order, until it says stop."""
        calls = {"forward": self._device_forward, "prompt_logprobs": self._device_prompt_logprobs,
                 "sample": self._device_sample, "init_slot": self._device_init_slot,
                 "write_tables": self._device_write_tables, "reset": self.reset_device_state}
        while True:
            kind, *args = channel.recv()
            if kind == "stop":
                return
            calls[kind](*args)

    def reset_device_state(self) -> None:
        """Fresh (zeroed) KV cache, block tables and sampler state with the same shapes and placement (on every
        process)."""
        if self.peers is not None:
            self.peers.send(("reset",))
        self.cache, self.tables, self.sampler_state = jax.tree.map(
            lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding), self._shapes)
        self._pending = None

    # --- one step, in two halves ---

    def launch(self, scheduled: list[tuple[Sequence, int]]) -> Launched:
        """Dispatches the step's forward pass (and its prompt logprobs) without waiting for anything; the
        sequences' state on the host is not touched beyond what was sent (see `Scheduled`)."""
        num_tokens, num_seqs = self._sizes(sum(n for _, n in scheduled))
        max_writes = self._max_writes(num_tokens)
        step, extra, record, dense = build_step(scheduled, num_tokens, num_seqs, max_writes)
        overflow = self._max_writes(self.buckets[-1])
        for i in range(0, len(extra), overflow):  # many pages at once: a long cached prefix admitted
            chunk = np.full((overflow, 3), -1, np.int32)
            chunk[:len(extra[i:i + overflow])] = extra[i:i + overflow]
            self._device_write_tables(chunk)
        for seq in dense:
            self._device_init_slot(seq.slot, slot_rows(seq, self.cfg.vocab_size, self.eos_token_ids))
        self._device_forward(step)
        wanted = [seq.needs_prompt_logprobs for seq, _ in scheduled]
        launched = Launched(record, wanted)
        if any(wanted):
            targets = np.zeros(num_tokens, np.int32)
            t = 0
            for seq, n, start in zip(record.seqs, record.num_tokens, record.starts):
                following = seq.token_ids[start + 1:start + n + 1]  # a sampled successor is not a prompt target
                targets[t:t + len(following)] = following
                t += n
            launched.prompt = self._device_prompt_logprobs(targets)
        return launched

    def sample(self, launched: Launched) -> None:
        """Dispatches the step's sampler, with the grammar masks of its constrained rows as their grammars
        stand now (every token up to the previous step accepted)."""
        record = launched.record
        constrained = [i for i, (seq, samples) in enumerate(zip(record.seqs, record.samples))
                       if samples and seq.grammar is not None and not seq.finished]
        masks = rows = None
        if constrained:
            num_seqs = self._sizes(sum(record.num_tokens))[1]
            m = min(num_seqs, MASK_ROWS)
            padded = -(-len(constrained) // m) * m
            masks = np.zeros((padded, -(-self.cfg.vocab_size // 32)), np.int32)
            rows = np.full(padded, num_seqs, np.int32)
            for j, i in enumerate(constrained):
                if record.seqs[i].grammar.fill(masks[j]):
                    rows[j] = i
        launched.tokens, launched.logprobs = self._device_sample(rows, masks)

    def results(self, launched: Launched):
        """Waits for a sampled step. Returns, for each scheduled sequence in order, its sampled token [n], and the
        logprobs (chosen [n], its rank [n], top ids [n, K], top logprobs [n, K]; None when no sequence asked for
        them); then the prompt logprobs: None in a step where nobody wants them, else per scheduled sequence
        None or the four arrays over its fed tokens [m], [m], [m, K], [m, K] (row j: the prompt token after its
        j-th fed token)."""
        record = launched.record
        n = len(record.seqs)
        waited = time.perf_counter()  # from here the host only waits for the device's results
        tokens = sharding.host(launched.tokens)[:n]
        # Logprob arrays cross to the host only in steps where some sequence asked for them.
        wants = any(seq.params.logprobs is not None for seq in record.seqs)
        logprobs = tuple(sharding.host(x)[:n] for x in launched.logprobs) if wants else None
        prompt = None
        if launched.prompt is not None:
            arrays = [sharding.host(x) for x in launched.prompt]
            prompt, t = [], 0
            for m, want in zip(record.num_tokens, launched.wanted):
                prompt.append(tuple(a[t:t + m] for a in arrays) if want else None)
                t += m
        self.device_wait_seconds += time.perf_counter() - waited
        return tokens, logprobs, prompt

    def _padding_step(self, size: int, constrained: bool) -> None:
        """Runs one all-padding step of bucket `size` (with grammar masks: the masked sampler) to the end."""
        num_tokens, num_seqs = self._sizes(size)
        step, *_ = build_step([], num_tokens, num_seqs, self._max_writes(num_tokens))
        self._device_forward(step)
        if constrained:
            m, words = min(num_seqs, MASK_ROWS), -(-self.cfg.vocab_size // 32)
            tokens, _ = self._device_sample(np.full(m, num_seqs, np.int32), np.zeros((m, words), np.int32))
        else:
            jax.block_until_ready(self._device_prompt_logprobs(np.zeros(num_tokens, np.int32)))
            tokens, _ = self._device_sample()
        jax.block_until_ready(tokens)

    def profile_step(self) -> None:
        """The largest step, once (compiled for it): what sizing the KV cache from device memory measures."""
        self._padding_step(self.buckets[-1], constrained=False)

    def _program(self, name: str, size: int):
        """The step program `name` for `size` tokens (forward, prompt_logprobs) or rows (sample, masks): the
        executable compiled ahead for it, else the jitted function (which compiles on first use)."""
        return self.executables.get((name, size)) or getattr(self.programs, name)

    def compile_ahead(self, workers: int) -> None:
        """Compiles every bucket's step programs on `workers` threads (XLA compiles outside the GIL), largest
        buckets first, and keeps the executables: the steps then call them directly (no tracing again)."""
        params, cache, tables, state = jax.tree.map(lambda x: abstract(x, x.sharding),
                                                    (self.params, self.cache, self.tables, self.sampler_state))

        def bucket(size):
            def one(name, jitted, *args):
                exe = jitted.trace(*args).lower().compile()
                rows = name in ("sample", "masks")
                self.executables[(name, min(size, self.max_num_seqs) if rows else size)] = exe
                return None, exe.out_info

            compile_bucket(self.programs, params, cache, tables, state, self.mesh, size, self.max_num_seqs,
                           self.cache.page_size, self.cfg.vocab_size, one)

        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(bucket, sorted(self.buckets, reverse=True)))

    def warm_up(self, progress: bool = True) -> None:
        """Compiles every bucket's programs: ahead, in parallel, where there are several cores and one process
        (then only the smallest bucket runs an all-padding step, which checks the executables against the
        runner's arrays); else by running an all-padding step of each bucket (it writes nothing and reads
        nothing), which several processes' followers mirror and so compile too."""
        workers = min(len(os.sched_getaffinity(0)), len(self.buckets))
        if workers > 1 and self.peers is None:  # followers of several processes compile by mirroring the steps
            self.compile_ahead(workers)
        sizes = self.buckets[:1] if self.executables else self.buckets
        for size in tqdm(sizes, desc="Compiling step buckets", unit="bucket", disable=not progress):
            for constrained in (False, True):
                self._padding_step(size, constrained)
        vocab = self.cfg.vocab_size
        self._device_init_slot(0, (np.zeros(vocab, np.int32), np.zeros(vocab, np.bool_), np.zeros(vocab, np.float32),
                                   np.zeros(vocab, np.bool_)))
        self._device_write_tables(np.full((self._max_writes(self.buckets[-1]), 3), -1, np.int32))
