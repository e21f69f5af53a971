"""The step's input: what the host sends per step, and the persistent per-slot state it updates on the device.

Per slot (one per running sequence), the device keeps its block table and its sampler state (sampler.py). A
step sends only what changed: the tokens it feeds, one row per scheduled sequence, the block-table entries of
pages allocated since the sequence's last step, and, for sequences admitted in this step, their sampling
parameters (written into their slots by the step itself).

A fed token may be a placeholder (-1): the token the sequence sampled in the previous step, which the host has
not read back yet; the device takes it from the slot's `last_token`. That is what lets the host schedule and
dispatch step N+1 before step N's tokens reach it. Rows name the token whose logits they sample by the end of
their query (`Q_END`), so a row could feed several tokens and have several positions verified (speculative
decoding) without a change of shape here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.models import base as models_base
from jaxserve.models.base import Batch
from jaxserve.core.sampler import FLOAT_PARAMS, INT_PARAMS, needs_dense_rows
from jaxserve.core.sequence import Sequence

PLACEHOLDER = -1  # a fed token the device takes from the slot's last sampled token

# Columns of StepInput.rows. SAMPLES: the row's query reaches the end of its sequence, so it samples a token;
# FRESH: the sequence was admitted in this step (its parameters follow in the INT_PARAMS columns and
# row_params).
SLOT, KV_LEN, Q_END, SAMPLES, FRESH = range(5)
ROW_PARAMS = 5  # INT_PARAMS start here
NUM_ROW_COLS = ROW_PARAMS + len(INT_PARAMS)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepInput:
    """What the host sends for one step. T tokens, S rows, E block-table writes."""

    token_ids: jax.Array  # [T] int32, PLACEHOLDER for the slot's last sampled token
    positions: jax.Array  # [T] int32
    token_rows: jax.Array  # [T] int32: the row each token belongs to; S for padding
    rows: jax.Array  # [S, NUM_ROW_COLS] int32; padding rows have slot -1 and Q_END = the fed token count
    row_params: jax.Array  # [S, len(FLOAT_PARAMS)] float32: FLOAT_PARAMS of fresh rows
    table_writes: jax.Array  # [E, 3] int32: (slot, index in its block table, page); slot -1: padding


def num_table_writes(num_tokens: int, num_seqs: int, page_size: int) -> int:
    """Block-table writes one step carries: a page per row and per page_size tokens cover every step that
    admits no cached prefix; more go through extra `write_tables` calls before the step."""
    return num_seqs + num_tokens // page_size + 1


def write_tables(tables, writes):
    """tables: [slots, P] int32; writes: [E, 3] (slot, index, page), slot -1 dropped."""
    slot = jnp.where(writes[:, 0] < 0, tables.shape[0], writes[:, 0])
    return tables.at[slot, writes[:, 1]].set(writes[:, 2], mode="drop")


def model_batch(step: StepInput, tables, last_token, page_size: int, ring: int = 0) -> Batch:
    """The model's view of the step, from the step input and the per-slot state on the device. tables: [slots, P]
    (after this step's writes); last_token: [slots]; ring: pages of each slot's ring in the ringed layers (0: none,
    models.base.ring_pages)."""
    rows = step.rows
    s = rows.shape[0]
    slot = rows[:, SLOT]
    row_slot = jnp.maximum(slot, 0)
    valid = step.token_rows < s
    token_row = jnp.minimum(step.token_rows, s - 1)
    token_slot = row_slot[token_row]
    token_ids = jnp.where(step.token_ids == PLACEHOLDER, last_token[token_slot], step.token_ids)
    pos = step.positions
    row_tables = tables[row_slot]

    def slot_mapping(row_tables):
        pages = row_tables[token_row, pos // page_size]
        return jnp.where(valid, pages * page_size + pos % page_size, -1)

    q_end = rows[:, Q_END]
    cu = jnp.concatenate([jnp.zeros(1, jnp.int32), q_end])
    num_seqs = jnp.sum(slot >= 0, dtype=jnp.int32)[None]
    rings = {}
    if ring:
        ring_tables = models_base.ring_tables(row_slot, ring, tables.shape[1])
        rings = dict(ring_slot_mapping=slot_mapping(ring_tables), ring_block_tables=ring_tables)
    return Batch(jnp.where(valid, token_ids, 0), pos, slot_mapping(row_tables), rows[:, KV_LEN], row_tables, cu,
                 num_seqs, jnp.maximum(q_end - 1, 0), **rings)


@dataclasses.dataclass
class Scheduled:
    """The host's record of one dispatched step, kept until its tokens are read back."""

    seqs: list[Sequence]
    num_tokens: list[int]  # fed tokens per sequence
    starts: list[int]  # each sequence's computed tokens before the step
    samples: list[bool]  # whether each row samples a token


def build_step(scheduled: list[tuple[Sequence, int]], num_tokens: int, num_seqs: int, max_writes: int):
    """Host arrays for the scheduled sequences, padded to num_tokens / num_seqs, the block-table writes beyond the
    max_writes this step carries ([N, 3], N >= 0), the Scheduled record, and the sequences that need their [V]
    sampler rows written before the step. Marks the pages and the fresh slots as sent (each sequence's
    `num_pages_on_device`, `slot_fresh`)."""
    ids: list[int] = []
    positions: list[int] = []
    token_rows: list[int] = []
    rows = np.zeros((num_seqs, NUM_ROW_COLS), np.int64)
    row_params = np.zeros((num_seqs, len(FLOAT_PARAMS)), np.float32)
    writes: list[tuple[int, int, int]] = []
    dense: list[Sequence] = []
    record = Scheduled([], [], [], [])
    t = 0
    for i, (seq, n) in enumerate(scheduled):
        start = seq.num_computed_tokens
        known = len(seq.token_ids)
        end = start + n
        ids += seq.token_ids[start:end]
        if end > known:  # the token sampled in the step before, still on the device
            ids.append(PLACEHOLDER)
        positions += range(start, end)
        token_rows += [i] * n
        t += n
        samples = end == known + seq.num_in_flight
        row = rows[i]
        row[SLOT], row[KV_LEN], row[Q_END], row[SAMPLES] = seq.slot, end, t, samples
        if seq.slot_fresh:
            seq.slot_fresh = False
            seq.num_pages_on_device = 0
            floats, ints = seq.slot_params
            row[FRESH] = 1
            if needs_dense_rows(seq):
                dense.append(seq)
            row[ROW_PARAMS:] = (*ints, seq.num_output_tokens, seq.num_prompt_tokens)
            row_params[i] = floats
        table = seq.block_table
        writes += [(seq.slot, j, table[j]) for j in range(seq.num_pages_on_device, len(table))]
        seq.num_pages_on_device = len(table)
        record.seqs.append(seq)
        record.num_tokens.append(n)
        record.starts.append(start)
        record.samples.append(samples)
    rows[len(scheduled):, SLOT] = -1
    rows[len(scheduled):, Q_END] = t
    pad = num_tokens - t
    table_writes = np.full((max_writes, 3), -1, np.int32)
    carried = writes[len(writes) - max_writes:] if len(writes) > max_writes else writes
    if carried:
        table_writes[:len(carried)] = carried
    extra = np.asarray(writes[:len(writes) - len(carried)], np.int32).reshape(-1, 3)
    step = StepInput(np.asarray(ids + [0] * pad, np.int32), np.asarray(positions + [0] * pad, np.int32),
                     np.asarray(token_rows + [num_seqs] * pad, np.int32), rows.astype(np.int32), row_params,
                     table_writes)
    return step, extra, record, dense
