"""Page allocator for the paged KV cache: a free list, reference counts and per-sequence block tables.

Reference counts let several sequences hold the same page (prefix sharing); a page returns to the
free list when its count drops to zero.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from jaxserve.sequence import Sequence


class BlockManager:
    def __init__(self, num_pages: int, page_size: int):
        self.num_pages = num_pages
        self.page_size = page_size
        self.free_pages: deque[int] = deque(range(num_pages))
        self.refs = np.zeros(num_pages, np.int32)

    @property
    def num_free(self) -> int:
        return len(self.free_pages)

    def pages_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra pages `seq` needs to hold its first `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.page_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.pages_needed(seq, num_tokens) <= self.num_free

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        needed = self.pages_needed(seq, num_tokens)
        if needed > self.num_free:
            raise RuntimeError(f"out of KV pages: need {needed}, {self.num_free} free")
        for _ in range(needed):
            page = self.free_pages.popleft()
            self.refs[page] = 1
            seq.block_table.append(page)

    def free(self, seq: Sequence) -> None:
        for page in reversed(seq.block_table):
            self.refs[page] -= 1
            assert self.refs[page] >= 0, f"page {page} freed twice"
            if self.refs[page] == 0:
                self.free_pages.append(page)
        seq.block_table = []
