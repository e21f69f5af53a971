"""Page allocator for the paged KV cache: free list, reference counts, block tables and the prefix cache.

Prefix cache: a page whose tokens are all computed is keyed by a blake2b digest chained over (previous page's
digest, its token ids), so a key names the whole prefix up to that page; a collision would need a collision of
the digest (Python's `hash` of tuples can be made to collide on purpose). The chain starts from the request's
`cache_salt`: requests with different salts share nothing, and unsalted requests never share with salted ones. A new sequence reuses the cached pages of
its longest matching prefix (reference count + 1) and computes only the rest. A page whose count drops to
zero keeps its contents and key, and waits in the free list in least-recently-freed order: allocation takes
the oldest first, which evicts it from the cache. Only full pages are shared, and a sequence only writes
past its computed tokens, so a shared page is never written.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from jaxserve.core.sequence import Sequence


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.free_pages: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_pages))  # LRU first
        self.refs = np.zeros(num_pages, np.int32)
        self.cached: dict[bytes, int] = {}  # prefix key -> page
        self.page_key: dict[int, bytes] = {}  # page -> prefix key (pages whose contents are reusable)
        self.hit_tokens = 0
        self.queried_tokens = 0

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
            page, _ = self.free_pages.popitem(last=False)
            key = self.page_key.pop(page, None)  # evict its old contents from the cache
            if key is not None:
                del self.cached[key]
            self.refs[page] = 1
            seq.block_table.append(page)

    def free(self, seq: Sequence) -> None:
        # Pages go back tail first, so a prefix's later pages are evicted before its earlier ones.
        for page in reversed(seq.block_table):
            self.refs[page] -= 1
            assert self.refs[page] >= 0, f"page {page} freed twice"
            if self.refs[page] == 0:
                self.free_pages[page] = None
        seq.block_table = []
        seq.page_keys = []
        seq.num_computed_tokens = 0  # without its pages, nothing of the sequence is in the cache

    def match_prefix(self, seq: Sequence) -> None:
        """For a sequence with no pages yet: take the cached pages of its longest cached prefix.

        At least one token is left to compute, since its logits are needed.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        # Cached pages have no logits: a request that wants prompt logprobs computes its whole prompt (as vLLM).
        if not self.enable_prefix_caching or seq.needs_prompt_logprobs:
            return
        ps = self.page_size
        usable = (len(seq) - 1) // ps
        self.queried_tokens += len(seq)  # vLLM's unit: a lookup queries every token of the sequence
        key = root_key(seq.params.cache_salt)
        for i in range(usable):
            key = page_key(key, seq.token_ids[i * ps:(i + 1) * ps])
            page = self.cached.get(key)
            if page is None:
                break
            if self.refs[page] == 0:
                del self.free_pages[page]
            self.refs[page] += 1
            seq.block_table.append(page)
            seq.page_keys.append(key)
        seq.num_computed_tokens = seq.num_cached_tokens = len(seq.block_table) * ps
        self.hit_tokens += seq.num_cached_tokens

    def register_full_pages(self, seq: Sequence) -> None:
        """Adds the pages that `seq` has completely computed, and whose tokens the host knows, to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        ps = self.page_size
        for i in range(len(seq.page_keys), min(seq.num_computed_tokens, len(seq.token_ids)) // ps):
            parent = seq.page_keys[-1] if seq.page_keys else root_key(seq.params.cache_salt)
            key = page_key(parent, seq.token_ids[i * ps:(i + 1) * ps])
            seq.page_keys.append(key)
            page = seq.block_table[i]
            if key not in self.cached:
                self.cached[key] = page
                self.page_key[page] = key

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


def root_key(cache_salt: str | None) -> bytes:
    """The chain's start: one value for unsalted requests, a digest of the salt (a distinct length) otherwise."""
    if cache_salt is None:
        return b""
    return hashlib.blake2b(b"salt\0" + cache_salt.encode("utf-8"), digest_size=32).digest()


def page_key(parent: bytes, tokens: list[int]) -> bytes:
    """The key of a full page: a digest of its parent's key and its token ids (int64 little-endian bytes)."""
    h = hashlib.blake2b(parent, digest_size=32)
    h.update(np.asarray(tokens, "<i8").tobytes())
    return h.digest()
