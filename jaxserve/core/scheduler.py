"""Continuous batching: which sequences run in the next step, and with how many tokens.

Each step fills a token budget: running sequences first (one token each when decoding, or the next
chunk of an unfinished prefill), then new sequences from the waiting queue, whose prompts are cut
into chunks so a long prompt never stalls the running decodes. When pages run out, the newest
running sequence is preempted: its pages are freed and it goes back to the front of the waiting queue,
to be recomputed later (its tokens so far are kept, so greedy output is unchanged).

Steps overlap (engine.py): a sequence's token sampled in the step before may not have reached the host yet. It
counts as a token to compute (`num_uncomputed`), fed as a placeholder; a sequence whose token in flight is its
last by length is not scheduled again, and a preempted one is readmitted only once its token is read.

Policies (vLLM's --scheduling-policy): "fcfs" serves in arrival order; "priority" keeps the waiting queue ordered
by (priority, arrival), lower first, and preempts the running sequence that comes last in that order.
"""

from __future__ import annotations

from collections import deque

from jaxserve.core.block_manager import BlockManager
from jaxserve.core.sequence import Sequence, Status


POLICIES = ("fcfs", "priority")


def _order(seq: Sequence) -> tuple[int, int]:
    return seq.priority, seq.seq_id  # seq ids grow with arrival; a request's samples are adjacent


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 policy: str = "fcfs"):
        if policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.by_priority = policy == "priority"
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_slots = list(range(max_num_seqs))  # one sampler-state row per running sequence
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        if self.by_priority:
            self._insert(seq)
        else:
            self.waiting.append(seq)

    def add_first(self, seqs: list[Sequence]) -> None:
        """Puts `seqs` at the head of the waiting queue, in order (a request's later samples, admitted next);
        by priority, at their place in the order (ahead of every later request of their priority)."""
        if self.by_priority:
            for seq in seqs:
                self._insert(seq)
        else:
            self.waiting.extendleft(reversed(seqs))

    def _insert(self, seq: Sequence) -> None:
        at = next((i for i, w in enumerate(self.waiting) if _order(w) > _order(seq)), len(self.waiting))
        self.waiting.insert(at, seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """Returns [(sequence, number of its tokens to compute this step)]."""
        budget = self.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != Status.RUNNING or seq.ends_in_flight:  # preempted earlier in this loop; or done
                continue
            n = min(seq.num_uncomputed, budget)
            while not self.blocks.can_allocate(seq, seq.num_computed_tokens + n):
                victim = max(self.running, key=_order) if self.by_priority else self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:
                continue
            self.blocks.allocate(seq, seq.num_computed_tokens + n)
            batch.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_in_flight:  # preempted with a token still on the device: admitted once it is read
                break
            self.blocks.match_prefix(seq)
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.can_allocate(seq, seq.num_computed_tokens + n):
                self.blocks.free(seq)  # give the matched prefix back; it stays cached
                break
            self.waiting.popleft()
            self.blocks.allocate(seq, seq.num_computed_tokens + n)
            seq.slot, seq.slot_fresh = self.free_slots.pop(), True
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.free_slots.append(seq.slot)
        self.blocks.free(seq)
        seq.status = Status.WAITING
        if self.by_priority:
            self._insert(seq)
        else:
            self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        """Ends a sequence wherever it is (running, waiting, or aborted) and frees its pages at once."""
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
            self.free_slots.append(seq.slot)
        elif seq.status == Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
