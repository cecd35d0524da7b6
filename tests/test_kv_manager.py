"""KVManager: its five verbs with exact block ids, and an integrity check that catches what it claims to."""

import pytest

from batchllm.kv.block_pool import block_hashes
from batchllm.kv.manager import KVManager
from batchllm.request import Sequence


def seq(i, n, start=0):
    return Sequence(i, list(range(100, 100 + n)), start, None, is_node=False)


def test_allocate_is_all_or_nothing_and_counts_from_the_sequence_start():
    kv = KVManager(5, 4)
    a = seq(0, 20, start=8)  # owns positions 8..19: 3 blocks
    assert kv.blocks_for(a, 20) == 3 and kv.missing(a, 13) == 2
    assert kv.allocate(a, 13) and a.blocks == [0, 1]
    assert not kv.allocate(a, 8 + 4 * 6) and a.blocks == [0, 1]  # 6 blocks > 2 held + 3 free: nothing changes
    assert kv.allocate(a, 20) and a.blocks == [0, 1, 2] and kv.num_free == 2
    kv.check_integrity([a])


def test_a_sequence_that_starts_mid_block_holds_its_first_block_from_the_boundary():
    kv = KVManager(6, 4)
    a = seq(0, 20, start=10)  # below a node ending at 10: position 10 is slot 2 of its first block
    assert kv.blocks_for(a, 10) == 0 and kv.blocks_for(a, 11) == 1 and kv.blocks_for(a, 12) == 1
    assert kv.blocks_for(a, 13) == 2 and kv.blocks_for(a, 20) == 3
    assert kv.allocate(a, 12) and a.blocks == [0]
    assert kv.allocate(a, 17) and a.blocks == [0, 1, 2]
    assert [a.slot_of(p, 4) for p in (10, 11, 12, 15, 16)] == [2, 3, 4, 7, 8]
    assert kv.release_ahead(a, 13) and a.blocks == [0, 1]
    kv.check_integrity([a])


def test_free_returns_blocks_tail_first_only_when_caching():
    for caching, order in ((False, [0, 1, 2, 3]), (True, [3, 2, 1, 0])):
        kv = KVManager(4, 2, caching=caching)
        a = seq(0, 8)
        kv.allocate(a, 8)
        kv.free(a)
        assert a.blocks == [] and kv.free_blocks() == order


def test_match_prefix_reuses_cached_blocks_and_keeps_one_token_to_compute():
    kv = KVManager(6, 2, caching=True)
    a = seq(0, 6)
    a.block_hashes = block_hashes(a.token_ids, 2)
    kv.allocate(a, 6)
    kv.cache_filled(a, 0, 6)
    kv.free(a)
    b = seq(1, 6)  # the same prompt: the last block is recomputed for its logits
    b.block_hashes = list(a.block_hashes)
    hit = kv.match_prefix(b)
    assert hit == [0, 1] and kv.revive_cost(hit) == 2 and kv.cached_prefix_blocks(b) == 3
    kv.take_prefix(b, hit)
    assert b.blocks == [0, 1] and kv.free_blocks() == [3, 4, 5, 2]
    kv.check_integrity([b])


def test_release_ahead_hands_back_only_blocks_past_the_position():
    kv = KVManager(8, 4)
    a = seq(0, 4)
    kv.allocate(a, 24)  # 6 blocks taken ahead of an output that may never come
    assert not kv.release_ahead(a, 24)
    assert kv.release_ahead(a, 9) and a.blocks == [0, 1, 2]  # position 8 sits in block 2
    assert kv.free_blocks() == [3, 4, 5, 6, 7]


def test_check_integrity_catches_a_leaked_and_a_double_held_block():
    kv = KVManager(4, 2)
    a, b = seq(0, 4), seq(1, 2)
    kv.allocate(a, 4)
    kv.allocate(b, 2)
    with pytest.raises(AssertionError, match="reference counts"):
        kv.check_integrity([a])  # b's block is referenced by nobody the caller knows: a leak
    b.blocks.append(a.blocks[0])  # a block list edited behind the manager's back
    with pytest.raises(AssertionError, match="reference counts"):
        kv.check_integrity([a, b])
