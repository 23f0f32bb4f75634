import pytest
import torch

from kvlab.engine.kv_cache_manager import KVCacheManager
from kvlab.engine.request import Request


def computed_request(manager: KVCacheManager, request_id: str, token_ids: list[int]) -> Request:
    """A request whose prompt went through one full prefill step (blocks published)."""
    request = Request(request_id, token_ids)
    hit = manager.get_computed_blocks(request)
    assert manager.allocate_slots(request, request.num_tokens - hit.num_tokens, hit) is not None
    request.num_computed_tokens = request.num_tokens
    manager.cache_full_blocks(request)
    return request


def test_prefix_hit_reuses_blocks_and_leaves_the_last_token():
    manager = KVCacheManager(num_blocks=16, block_size=4)
    first = computed_request(manager, "a", list(range(12)))
    second = Request("b", list(range(12)))
    hit = manager.get_computed_blocks(second)
    # 12 tokens = 3 full blocks, but the last token must be computed for its logits: 2 blocks hit.
    assert hit.block_ids == tuple(manager.block_ids("a")[:2]) and hit.num_tokens == 8
    manager.allocate_slots(second, 4, hit)
    assert [manager.pool.blocks[b].ref_count for b in manager.block_ids("a")] == [2, 2, 1]
    assert manager.get_computed_blocks(Request("c", [0, 1, 2, 3, 9, 9, 9, 9, 9])).num_tokens == 4
    manager.free(first)
    manager.free(second)
    assert manager.pool.num_free_blocks == 16
    assert manager.prefix_stats.num_hit_tokens == 8 and manager.prefix_stats.hit_rate == pytest.approx(8 / 24)


def test_hash_collisions_never_give_a_wrong_hit():
    # Every block hashes to the same value: lookups may miss, but must never return other tokens.
    manager = KVCacheManager(num_blocks=16, block_size=4, hash_fn=lambda parent, tokens: 42)
    computed_request(manager, "a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert manager.get_computed_blocks(Request("b", [1, 2, 3, 5, 5, 6, 7, 8, 9])).num_tokens == 0
    # Same second block after a different first block: the parent check rejects it.
    other = Request("c", [9, 9, 9, 9, 5, 6, 7, 8, 9])
    assert manager.get_computed_blocks(other).num_tokens == 0
    # The index holds the last block published under 42, (5, 6, 7, 8): looking up the first block
    # (1, 2, 3, 4) finds it as the candidate and rejects it. A collision costs a miss, never a wrong hit.
    assert manager.get_computed_blocks(Request("d", [1, 2, 3, 4, 5, 6, 7, 8, 0])).num_tokens == 0
    # With a single colliding block published, the exact prefix still hits.
    lone = KVCacheManager(num_blocks=4, block_size=4, hash_fn=lambda parent, tokens: 42)
    computed_request(lone, "a", [1, 2, 3, 4, 5])
    hit = lone.get_computed_blocks(Request("e", [1, 2, 3, 4, 6]))
    assert hit.num_tokens == 4 and lone.pool.blocks[hit.block_ids[0]].token_ids == (1, 2, 3, 4)


def test_allocate_returns_none_and_changes_nothing_when_short():
    manager = KVCacheManager(num_blocks=3, block_size=4)
    request = Request("a", list(range(10)))
    assert manager.allocate_slots(request, 10) is not None  # 3 blocks
    request.num_computed_tokens = 10
    other = Request("b", [1])
    assert manager.allocate_slots(other, 1) is None
    assert manager.block_ids("b") == [] and manager.pool.num_free_blocks == 0
    assert manager.allocate_slots(request, 2) == []  # slots 10, 11 fit in the last block
    assert manager.allocate_slots(request, 3) is None


def _filled_cache(num_blocks: int, block_size: int, num_layers: int = 2, heads: int = 2, dim: int = 3):
    return [
        (torch.randn(num_blocks, block_size, heads, dim), torch.randn(num_blocks, block_size, heads, dim))
        for _ in range(num_layers)
    ]


def _slots_of(manager, request_id, positions):
    table = manager.block_ids(request_id)
    return [table[p // manager.block_size] * manager.block_size + p % manager.block_size for p in positions]


@pytest.mark.parametrize("per_head", [False, True])
def test_compact_copies_kept_kv_and_really_frees_blocks(per_head):
    manager = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    request = Request("a", list(range(14)))
    manager.allocate_slots(request, 14)
    request.num_computed_tokens = 14
    caches = _filled_cache(8, 4)
    flat = [[c.view(-1, 2, 3).clone() for c in layer] for layer in caches]
    old_slots = _slots_of(manager, "a", range(14))
    if per_head:
        kept = torch.tensor([[[0, 5, 13], [1, 2, 3]], [[10, 11, 12], [0, 7, 9]]])
    else:
        kept = torch.tensor([[0, 5, 13], [4, 8, 12]])  # layers keep different tokens, same count
    assert manager.pool.num_used_blocks == 4
    old_ids = list(manager.block_ids("a"))
    assert manager.compact(request, kept, caches) == 3  # blocks freed
    assert manager.pool.num_used_blocks == 1 and manager.block_ids("a") == old_ids[:1]  # in place
    assert request.num_cached_tokens == 3 and request.num_computed_tokens == 14
    new_slots = _slots_of(manager, "a", range(3))
    for layer in range(2):
        for which in range(2):
            now = caches[layer][which].view(-1, 2, 3)
            for j in range(3):
                for head in range(2):
                    source = kept[layer, head, j] if per_head else kept[layer, j]
                    assert torch.equal(now[new_slots[j], head], flat[layer][which][old_slots[source], head])
    manager.free(request)
    assert manager.pool.num_free_blocks == 8


def test_compact_needs_no_free_block_and_rejects_bad_slots():
    """A full pool: a copy into fresh blocks had no room and left the request uncompacted."""
    manager = KVCacheManager(num_blocks=2, block_size=4)
    request = Request("a", list(range(8)))
    manager.allocate_slots(request, 8)
    request.num_computed_tokens = 8
    caches = _filled_cache(2, 4, num_layers=1)
    before = caches[0][0].view(-1, 2, 3).clone()
    slots = _slots_of(manager, "a", range(8))
    with pytest.raises(ValueError, match="lie in"):
        manager.compact(request, torch.tensor([[0, 8]]), caches)
    with pytest.raises(ValueError, match="layers"):
        manager.compact(request, torch.tensor([[0], [1]]), caches)
    assert manager.pool.num_free_blocks == 0
    assert manager.compact(request, torch.tensor([[1, 6]]), caches) == 1
    assert manager.pool.num_used_blocks == 1 and request.num_cached_tokens == 2
    now = caches[0][0].view(-1, 2, 3)
    assert torch.equal(now[slots[0]], before[slots[1]]) and torch.equal(now[slots[1]], before[slots[6]])


def test_compact_refuses_blocks_shared_through_the_prefix_cache():
    manager = KVCacheManager(num_blocks=4, block_size=4)
    request = Request("a", list(range(8)))
    manager.allocate_slots(request, 8)
    request.num_computed_tokens = 8
    manager.cache_full_blocks(request)  # published: another request could be reading them
    with pytest.raises(ValueError, match="shares blocks"):
        manager.compact(request, torch.tensor([[0, 1]]), _filled_cache(4, 4, num_layers=1))
