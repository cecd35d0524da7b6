"""Block pool: exact block ids, reference counts, free order and cache eviction order."""

import pytest

from batchllm.kv.block_pool import BlockPool, NoFreeBlocks, block_hashes


def test_allocate_takes_blocks_in_order_and_freed_uncached_blocks_come_back_first():
    pool = BlockPool(6)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(3) == [2, 3, 4]
    assert pool.ref_count == [1, 1, 1, 1, 1, 0]
    assert pool.num_free == 1
    pool.free([3, 1])  # no hash: reused before the never-used block 5, in the order freed
    assert list(pool.free_queue) == [3, 1, 5]
    assert pool.allocate(2) == [3, 1]
    assert pool.ref_count == [1, 1, 1, 1, 1, 0]
    assert list(pool.free_queue) == [5]
    pool.free([0])
    assert pool.allocate(2) == [0, 5]


def test_uncached_blocks_are_reused_before_cached_ones_are_evicted():
    pool = BlockPool(4)
    a, b, c, d = pool.allocate(4)
    pool.cache(a, 111)
    pool.free([a, b])  # a keeps its KV at the tail; b holds nothing and goes first
    assert list(pool.free_queue) == [b, a]
    assert pool.allocate(1) == [b]
    assert pool.lookup(111) == a
    pool.free([c])
    assert pool.allocate(2) == [c, a]  # a is evicted only when nothing else is free
    assert pool.lookup(111) is None


def test_allocate_too_many_changes_nothing():
    pool = BlockPool(3)
    pool.allocate(2)
    with pytest.raises(NoFreeBlocks):
        pool.allocate(2)
    assert pool.num_free == 1
    assert list(pool.free_queue) == [2]


def test_shared_block_freed_only_at_last_reference():
    pool = BlockPool(4)
    [b] = pool.allocate(1)
    pool.touch([b])
    pool.touch([b])
    assert pool.ref_count[b] == 3
    pool.free([b])
    pool.free([b])
    assert b not in pool.free_queue
    pool.free([b])
    assert list(pool.free_queue) == [0, 1, 2, 3]
    with pytest.raises(RuntimeError):
        pool.free([b])


def test_cached_blocks_are_revived_by_touch_and_evicted_lru():
    pool = BlockPool(4)
    a, b, c = pool.allocate(3)
    pool.cache(a, 111)
    pool.cache(b, 222)
    pool.free([b, a])  # b freed before a: b is evicted first
    assert pool.lookup(111) == a and pool.lookup(222) == b
    assert list(pool.free_queue) == [3, b, a]
    pool.touch([a])  # revived: leaves the queue, keeps its hash
    assert list(pool.free_queue) == [3, b]
    assert pool.lookup(111) == a
    assert pool.allocate(2) == [3, b]  # b handed out: its hash is evicted
    assert pool.lookup(222) is None
    assert pool.lookup(111) == a
    assert pool.block_hash[b] is None


def test_first_writer_wins_for_a_hash():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    pool.cache(a, 7)
    pool.cache(b, 7)
    assert pool.lookup(7) == a
    assert pool.block_hash[b] is None


def test_block_hashes_chain_over_full_blocks_only():
    h = block_hashes([1, 2, 3, 4, 5, 6, 7], 3)
    assert len(h) == 2
    assert h == block_hashes([1, 2, 3, 4, 5, 6], 3)
    assert block_hashes([9, 2, 3, 4, 5, 6], 3)[1] != h[1]  # a different first block changes every later hash
    assert block_hashes([1, 2, 3, 4, 5, 9], 3)[0] == h[0]
