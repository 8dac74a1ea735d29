"""BlockManager alone: reference counts, LRU eviction, keys chained by prefix, commit after compute."""

from engine.block_manager import BlockManager, hash_block
from engine.scheduler import Sequence
from engine.types import SamplingParams

BS = 4


def seq(tokens: list[int], name: str = "s") -> Sequence:
    return Sequence(name, list(tokens), SamplingParams())


def admit(mgr: BlockManager, s: Sequence) -> int:
    """What the scheduler does at admission; returns the cached tokens."""
    hits = mgr.cached_prefix(s)
    mgr.attach(s, hits)
    s.num_computed = len(hits) * BS
    assert mgr.allocate(s, s.num_tokens)
    return s.num_computed


def compute(s: Sequence) -> None:
    s.num_computed = s.num_tokens  # the runner's job after a successful forward


def test_keys_depend_on_the_whole_prefix() -> None:
    a = hash_block(b"", [1, 2, 3, 4])
    assert hash_block(b"", [1, 2, 3, 4]) == a
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(hash_block(b"", [0, 2, 3, 4]), [5, 6, 7, 8])
    assert hash_block(b"", [1, 2, 3, 5]) != a


def test_shared_prefix_is_reference_counted_and_cached_after_free() -> None:
    mgr = BlockManager(num_blocks=8, block_size=BS)
    a = seq(list(range(10)), "a")
    assert admit(mgr, a) == 0 and len(a.block_table) == 3
    compute(a)
    mgr.commit(a)  # blocks 0 and 1 are full and computed; block 2 holds 2 tokens
    assert mgr.num_cached == 2
    b = seq([*range(8), 99, 98, 97], "b")
    assert admit(mgr, b) == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [mgr.ref_counts[x] for x in a.block_table[:2]] == [2, 2]
    assert (mgr.num_queries, mgr.num_hits) == (10 + 11, 8)
    free_before = mgr.num_free
    mgr.free(a)
    assert [mgr.ref_counts[x] for x in b.block_table[:2]] == [1, 1]
    assert mgr.num_free == free_before + 1  # only a's own tail block came back
    mgr.free(b)
    assert mgr.num_free == 8 and mgr.num_cached == 2  # free, yet still cached
    c = seq([*range(8), 5], "c")
    assert admit(mgr, c) == 8  # revived from the evictable pool
    assert mgr.ref_counts[c.block_table[0]] == 1


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    mgr = BlockManager(num_blocks=8, block_size=BS)
    a = seq(list(range(8)))
    admit(mgr, a)
    compute(a)
    mgr.free(a)
    assert mgr.num_cached == 2
    again = seq(list(range(8)))
    assert admit(mgr, again) == 4  # the last block is recomputed, never written while shared
    assert again.num_tokens - again.num_computed == 4


def test_least_recently_freed_blocks_are_evicted_first_tail_first() -> None:
    mgr = BlockManager(num_blocks=4, block_size=BS)
    old, new = seq([1] * 8, "old"), seq([2] * 8, "new")
    tables = {}
    for s in (old, new):
        admit(mgr, s)
        compute(s)
        tables[s.request_id] = list(s.block_table)
        mgr.free(s)
    assert mgr.num_cached == 4 and mgr.num_free == 4
    taker = seq([3] * 4, "taker")
    admit(mgr, taker)  # needs one block: the tail of the least recently freed sequence goes
    assert taker.block_table == [tables["old"][1]]
    assert mgr.cached_prefix(seq([1] * 8 + [0])) == tables["old"][:1]  # old lost its second block only
    assert mgr.cached_prefix(seq([2] * 8 + [0])) == tables["new"]  # new is intact


def test_blocks_enter_the_cache_only_once_computed() -> None:
    mgr = BlockManager(num_blocks=8, block_size=BS)
    a = seq(list(range(12)))
    admit(mgr, a)
    a.num_computed = 5  # a forward of the rest failed: num_computed did not advance
    mgr.free(a)
    assert mgr.num_cached == 1 and mgr.num_free == 8
    assert len(mgr.cached_prefix(seq(list(range(12))))) == 1


def test_allocation_fails_without_side_effects_and_can_admit_counts_revived_blocks() -> None:
    mgr = BlockManager(num_blocks=3, block_size=BS)
    a = seq(list(range(8)))
    admit(mgr, a)
    compute(a)
    mgr.free(a)  # 2 cached blocks in the free pool, 1 plain
    b = seq([*range(8), 1, 2, 3, 4, 5])
    hits = mgr.cached_prefix(b)
    assert len(hits) == 2
    assert not mgr.can_admit(hits, 13, reserve=0)  # 2 revived + 2 new blocks > 3 free
    assert mgr.can_admit(hits, 12, reserve=0)  # 2 revived + 1 new
    assert not mgr.can_admit(hits, 12, reserve=1)
    other = seq([7] * 16)
    assert not mgr.allocate(other, 16) and other.block_table == []


def test_caching_off_keeps_nothing() -> None:
    mgr = BlockManager(num_blocks=4, block_size=BS, enable_caching=False)
    a = seq(list(range(8)))
    admit(mgr, a)
    compute(a)
    mgr.free(a)
    assert mgr.num_cached == 0 and mgr.cached_prefix(seq(list(range(9)))) == []
    assert (mgr.num_queries, mgr.num_hits) == (0, 0)
