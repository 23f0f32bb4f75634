import pytest

from kvlab.engine.block_pool import BlockIdentity, BlockPool


def test_allocate_and_free_keep_counts():
    pool = BlockPool(4)
    ids = pool.allocate(3)
    assert len(ids) == 3 and pool.num_free_blocks == 1 and pool.num_used_blocks == 3
    assert pool.allocate(2) is None and pool.num_free_blocks == 1  # nothing taken on failure
    pool.touch(ids[:1])
    pool.free(ids)
    assert pool.blocks[ids[0]].ref_count == 1 and pool.num_free_blocks == 3
    pool.free(ids[:1])
    assert pool.num_free_blocks == 4
    pool.check_invariants()
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free(ids[:1])


def test_lookup_verifies_tokens_and_parent_not_just_the_hash():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.cache_block(a, 7, (1, 2), None)
    pool.cache_block(b, 8, (3, 4), pool.blocks[a].identity)
    assert pool.lookup(7, (1, 2), None) == a
    assert pool.lookup(8, (3, 4), pool.blocks[a].identity) == b
    assert pool.lookup(7, (1, 9), None) is None  # same hash, other tokens: a collision, not a hit
    assert pool.lookup(8, (3, 4), None) is None  # same tokens after another parent
    assert pool.lookup(8, (3, 4), BlockIdentity(a, pool.blocks[a].generation + 1)) is None


def test_lru_eviction_order_and_uncached_blocks_go_first():
    pool = BlockPool(4)
    ids = pool.allocate(4)
    for i, block_id in enumerate(ids[:3]):
        pool.cache_block(block_id, 100 + i, (i,), None)
    pool.free([ids[1]])
    pool.free([ids[0]])
    pool.free([ids[3]])  # uncached: holds nothing reusable, reallocated before any cached block
    pool.free([ids[2]])
    assert pool.allocate(1) == [ids[3]]
    assert pool.allocate(1) == [ids[1]]  # least recently freed cached block is evicted first
    assert pool.lookup(101, (1,), None) is None and pool.num_evictions == 1
    pool.touch([ids[0]])  # a prefix hit revives a free cached block: it leaves the free queue
    assert pool.allocate(1) == [ids[2]] and pool.allocate(1) is None
    assert pool.lookup(100, (0,), None) == ids[0]
    pool.check_invariants()


def test_reused_block_changes_generation_and_leaves_the_index():
    pool = BlockPool(1)
    (block_id,) = pool.allocate(1)
    pool.cache_block(block_id, 5, (1,), None)
    old = pool.blocks[block_id].identity
    pool.free([block_id])
    assert pool.allocate(1) == [block_id]
    assert pool.blocks[block_id].identity != old and pool.hash_to_block_id == {}
