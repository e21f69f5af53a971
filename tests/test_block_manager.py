"""Page allocator properties under random operation sequences, and the prefix cache end to end."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxserve.core.block_manager import BlockManager
from jaxserve.sampling_params import SamplingParams
from jaxserve.core.sequence import Sequence

PAGE = 4
NUM_PAGES = 24


def _seq(i, tokens, cache_salt=None):
    return Sequence(i, str(i), 0, tokens, params=SamplingParams(cache_salt=cache_salt), seed=0,
                    max_len=1 << 20)


def _check_invariants(bm: BlockManager, live: list[Sequence]):
    held = [p for s in live for p in s.block_table]
    counts = np.bincount(held, minlength=bm.num_pages) if held else np.zeros(bm.num_pages, int)
    assert (bm.refs >= 0).all()
    assert (bm.refs == counts).all()  # every reference belongs to a live sequence's block table
    free = set(bm.free_pages)
    assert free == {p for p in range(bm.num_pages) if bm.refs[p] == 0}  # free exactly when unreferenced
    for s in live:
        assert len(set(s.block_table)) == len(s.block_table)  # no page twice in one table
    # a page held by two sequences is a shared full page: both hold the same tokens there
    for p in np.flatnonzero(counts > 1):
        contents = {tuple(s.token_ids[i * PAGE:(i + 1) * PAGE]) for s in live for i, q in enumerate(s.block_table)
                    if q == p}
        assert len(contents) == 1


# An operation: (kind, sequence slot, amount). Prompts come from a tiny alphabet so prefixes repeat.
ops = st.lists(st.tuples(st.sampled_from(["admit", "grow", "free"]), st.integers(0, 5), st.integers(1, 12)),
               max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops=ops, prefix=st.lists(st.integers(0, 2), min_size=0, max_size=12))
def test_allocator_invariants(ops, prefix):
    bm = BlockManager(NUM_PAGES, PAGE)
    slots: dict[int, Sequence] = {}
    next_id = 0
    for kind, slot, amount in ops:
        seq = slots.get(slot)
        if kind == "admit" and seq is None:
            seq = _seq(next_id, prefix + [next_id % 3] * amount)
            next_id += 1
            bm.match_prefix(seq)
            assert seq.num_computed_tokens < len(seq)
            if bm.can_allocate(seq, len(seq)):
                bm.allocate(seq, len(seq))
                seq.num_computed_tokens = len(seq)
                bm.register_full_pages(seq)
                slots[slot] = seq
            else:
                bm.free(seq)
        elif kind == "grow" and seq is not None:
            target = len(seq) + amount
            if bm.can_allocate(seq, target):
                seq.token_ids += [amount % 3] * amount
                bm.allocate(seq, target)
                seq.num_computed_tokens = target
                bm.register_full_pages(seq)
        elif kind == "free" and seq is not None:
            bm.free(seq)
            del slots[slot]
        _check_invariants(bm, list(slots.values()))
    for seq in slots.values():
        bm.free(seq)
    assert bm.num_free == NUM_PAGES and (bm.refs == 0).all()


def test_prefix_reuse_and_lru_eviction():
    bm = BlockManager(6, PAGE)
    a = _seq(0, list(range(10)))  # pages: [0..3] [4..7] [8, 9]
    bm.match_prefix(a)
    bm.allocate(a, 10)
    a.num_computed_tokens = 10
    bm.register_full_pages(a)
    b = _seq(1, list(range(8)) + [99, 98, 97])
    bm.match_prefix(b)
    assert b.num_cached_tokens == 8 and b.block_table == a.block_table[:2]
    bm.free(a)
    bm.free(b)
    # The cached pages survive in the free list; allocating every page evicts them oldest first.
    c = _seq(2, [7] * 24)
    bm.match_prefix(c)
    assert c.num_cached_tokens == 0
    bm.allocate(c, 24)
    d = _seq(3, list(range(10)))
    bm.match_prefix(d)
    assert d.num_cached_tokens == 0 and not bm.cached


def _computed(bm, seq):
    """Admits `seq` and computes it whole, so its full pages enter the prefix cache."""
    bm.match_prefix(seq)
    bm.allocate(seq, len(seq))
    seq.num_computed_tokens = len(seq)
    bm.register_full_pages(seq)
    return seq


def test_cache_salt_isolates_prefixes():
    bm = BlockManager(32, PAGE)
    prompt = list(range(13))  # three full pages, one token left to compute
    _computed(bm, _seq(0, prompt, cache_salt="tenant-a"))
    cached = {}
    for i, salt in enumerate(["tenant-a", "tenant-b", None, "", "tenant-a"], start=1):
        seq = _seq(i, prompt, cache_salt=salt)
        bm.match_prefix(seq)
        cached[salt if i < 5 else "again"] = seq.num_cached_tokens
        bm.free(seq)
    # Only the same salt shares; no salt and the empty salt are different from each other and from "tenant-a".
    assert cached == {"tenant-a": 12, "tenant-b": 0, None: 0, "": 0, "again": 12}
    _computed(bm, _seq(9, prompt))
    seq = _seq(10, prompt)
    bm.match_prefix(seq)
    assert seq.num_cached_tokens == 12  # unsalted requests share among themselves


def test_key_covers_the_whole_prefix():
    """Two prompts whose last full page is the same but whose earlier pages differ share nothing: the key of a
    page is chained over every page before it, not just its own tokens."""
    bm = BlockManager(32, PAGE)
    a = _computed(bm, _seq(0, [1, 1, 1, 1, 5, 6, 7, 8, 0]))
    b = _seq(1, [2, 2, 2, 2, 5, 6, 7, 8, 0])
    bm.match_prefix(b)
    assert b.num_cached_tokens == 0
    assert len(set(a.page_keys)) == 2 and all(len(k) == 32 for k in a.page_keys)
