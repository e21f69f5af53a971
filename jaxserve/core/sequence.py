"""One generation stream in the engine core: its token ids, how far the cache has computed them, and its pages."""

from __future__ import annotations

import enum

from jaxserve.core.sampler import slot_params
from jaxserve.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, seq_id: int, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, seed: int, max_len: int, priority: int = 0):
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index  # which of the request's n samples
        self.token_ids = list(prompt_token_ids)  # prompt + output
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.seed = seed
        self.priority = priority  # lower is served first under the priority policy
        self.status = Status.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache
        self.block_table: list[int] = []
        self.page_keys: list[bytes] = []  # prefix-cache keys of the full pages computed so far
        self.slot: int | None = None  # the scheduler slot (sampler-state row) while admitted
        self.slot_fresh = False  # admitted since the last step: its slot's parameters must be written
        self.num_pages_on_device = 0  # entries of block_table that the slot's table on the device has
        self.num_in_flight = 0  # tokens sampled on the device that the host has not read back yet
        self.slot_params = slot_params(params, seed)  # what admission writes into the slot (sampler.py)
        # Tokens (prompt + output) at which the sequence ends by length: max_tokens, or the engine's max_model_len.
        self.max_len = max_len if params.max_tokens is None else min(max_len, len(prompt_token_ids) + params.max_tokens)
        self.grammar = None  # a structured_output.GrammarState when the output is constrained or has a thinking budget
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        """Tokens to feed before the sequence is computed, counting one sampled on the device and not yet read."""
        return len(self.token_ids) + self.num_in_flight - self.num_computed_tokens

    @property
    def ends_in_flight(self) -> bool:
        """Its token on the device is its last by length: nothing more to schedule."""
        return self.num_in_flight > 0 and len(self.token_ids) + self.num_in_flight >= self.max_len

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Sample 0 of a request that asked for prompt logprobs, while part of its prompt is still to compute (the
        prompt is the same for every sample; a preempted sequence recomputes it, to the same values)."""
        return (self.params.prompt_logprobs is not None and self.index == 0
                and self.num_computed_tokens < self.num_prompt_tokens - 1)

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED
