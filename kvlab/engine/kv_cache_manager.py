"""Per-request block tables on top of the BlockPool: prefix-cache lookup, slot allocation, compaction.

Check-then-commit: `allocate_slots` either reserves everything a step needs or changes nothing and
returns None, so the scheduler can preempt and retry.

Compaction (a press keeps a subset of a request's tokens). Design choice: every layer keeps the
same number of tokens, so one block table serves all layers; which tokens each layer (or each
kv-head) keeps may differ, because slot j simply holds a different token's K/V in different layers.
Compaction moves the kept K/V to the request's first slots in place and frees the blocks past
them, so it never needs a free block. That needs blocks the request owns alone: a request with a
press neither publishes its blocks to the prefix cache nor takes hits from it. Keys keep their true
RoPE positions; new tokens continue from `request.num_computed_tokens`.
"""

from dataclasses import dataclass, field

import torch

from kvlab.engine.block_pool import BlockIdentity, BlockPool, HashFn, hash_block_tokens
from kvlab.engine.request import Request


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """Cached blocks that hold a request's leading tokens; nothing is reserved until allocate_slots."""

    block_ids: tuple[int, ...] = ()
    num_tokens: int = 0


@dataclass(slots=True)
class PrefixCacheStats:
    num_query_tokens: int = 0
    num_hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_query_tokens if self.num_query_tokens else 0.0


@dataclass(slots=True)
class KVCacheManager:
    num_blocks: int
    block_size: int
    enable_prefix_caching: bool = True
    hash_fn: HashFn = hash_block_tokens
    pool: BlockPool = field(init=False)
    req_to_block_ids: dict[str, list[int]] = field(init=False, default_factory=dict)
    req_to_num_published: dict[str, int] = field(init=False, default_factory=dict)
    prefix_stats: PrefixCacheStats = field(init=False, default_factory=PrefixCacheStats)

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        self.pool = BlockPool(self.num_blocks, self.hash_fn)

    def block_ids(self, request_id: str) -> list[int]:
        return self.req_to_block_ids.get(request_id, [])

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request: Request) -> PrefixHit:
        """Longest verified run of cached full blocks at the start of the request's tokens. The last
        token is never served from cache: its logits are needed to sample the next one. A request
        whose press observes the prompt's queries gets no hit: cached tokens' queries were never computed."""
        if (
            not self.enable_prefix_caching
            or not request.shares_blocks
            or request.num_computed_tokens
            or request.observes_prefill_queries
        ):
            return PrefixHit()
        num_full = (request.num_tokens - 1) // self.block_size
        self._ensure_hashes(request, num_full)
        block_ids: list[int] = []
        parent: BlockIdentity | None = None
        for i in range(num_full):
            tokens = tuple(request.token_ids_slice(i * self.block_size, (i + 1) * self.block_size))
            block_id = self.pool.lookup(request.block_hashes[i], tokens, parent)
            if block_id is None:
                break
            block_ids.append(block_id)
            parent = self.pool.blocks[block_id].identity
        return PrefixHit(tuple(block_ids), len(block_ids) * self.block_size)

    def allocate_slots(
        self, request: Request, num_new_tokens: int, prefix_hit: PrefixHit | None = None
    ) -> list[int] | None:
        """Reserve slots for `num_new_tokens` more tokens (after `prefix_hit`'s, for a request not yet
        started). Returns the newly allocated block ids (possibly none), or None, changing nothing,
        when the pool is short."""
        hit = prefix_hit or PrefixHit()
        block_ids = self.req_to_block_ids.get(request.request_id, [])
        num_slots = request.num_cached_tokens + hit.num_tokens + num_new_tokens
        if request.ring_slot() is not None:  # the token overwrites a slot the request already holds
            num_slots = request.num_cached_tokens
        num_needed = max(0, self.num_blocks_for(num_slots) - len(block_ids) - len(hit.block_ids))
        # Hit blocks sitting in the free queue stop being free once shared.
        num_revived = sum(1 for b in hit.block_ids if self.pool.blocks[b].ref_count == 0)
        if num_needed + num_revived > self.pool.num_free_blocks:
            return None
        self.pool.touch(hit.block_ids)
        new_block_ids = self.pool.allocate(num_needed)
        if new_block_ids is None:  # unreachable after the check above; keeps the contract explicit
            self.pool.free(hit.block_ids)
            return None
        if request.request_id not in self.req_to_block_ids:
            self.req_to_block_ids[request.request_id] = block_ids
            self.req_to_num_published[request.request_id] = len(hit.block_ids)
            if self.enable_prefix_caching and request.shares_blocks:
                self.prefix_stats.num_query_tokens += request.num_tokens
                self.prefix_stats.num_hit_tokens += hit.num_tokens
        block_ids.extend(hit.block_ids)
        block_ids.extend(new_block_ids)
        return new_block_ids

    def cache_full_blocks(self, request: Request) -> None:
        """Publish the request's blocks that became full of computed tokens (call after a step)."""
        if not self.enable_prefix_caching or not request.shares_blocks:
            return
        block_ids = self.req_to_block_ids[request.request_id]
        start = self.req_to_num_published[request.request_id]
        num_full = request.num_computed_tokens // self.block_size
        self._ensure_hashes(request, num_full)
        for i in range(start, num_full):
            parent = self.pool.blocks[block_ids[i - 1]].identity if i > 0 else None
            tokens = tuple(request.token_ids_slice(i * self.block_size, (i + 1) * self.block_size))
            self.pool.cache_block(block_ids[i], request.block_hashes[i], tokens, parent)
        self.req_to_num_published[request.request_id] = max(start, num_full)

    def free(self, request: Request) -> None:
        block_ids = self.req_to_block_ids.pop(request.request_id, [])
        self.req_to_num_published.pop(request.request_id, None)
        self.pool.free(block_ids[::-1])

    def compact(
        self, request: Request, kept_slots: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> int:
        """Move the kept K/V of a request to its first slots, in place, and free the blocks past them.

        kept_slots: (num_layers, num_kept) or (num_layers, num_kv_heads, num_kept) int64 indices into
            the request's cached slots [0, request.num_cached_tokens), in the order to store them.
        kv_caches: per layer (key_cache, value_cache), each (num_blocks, block_size, num_kv_heads, head_dim).
        Returns the number of blocks freed. It needs no free block, so it cannot fail for lack of room
        (a copy into fresh blocks could, and left a ring running on an uncompacted cache). The
        request's blocks must be its own: a request with a press never shares blocks (request.py).
        """
        num_kept = kept_slots.shape[-1]
        if kept_slots.shape[0] != len(kv_caches):
            raise ValueError(f"kept_slots has {kept_slots.shape[0]} layers, the cache has {len(kv_caches)}")
        if num_kept < 1 or num_kept > request.num_cached_tokens:
            raise ValueError(f"cannot keep {num_kept} of {request.num_cached_tokens} cached tokens")
        if int(kept_slots.min()) < 0 or int(kept_slots.max()) >= request.num_cached_tokens:
            raise ValueError(f"kept slots must lie in [0, {request.num_cached_tokens})")
        block_ids = self.req_to_block_ids[request.request_id]
        shared = [b for b in block_ids if self.pool.blocks[b].ref_count > 1 or self.pool.blocks[b].is_cached]
        if shared:
            raise ValueError(
                f"request {request.request_id!r} shares blocks {shared}: they cannot be compacted"
            )
        device = kv_caches[0][0].device
        table = torch.tensor(block_ids, dtype=torch.long, device=device)
        kept = kept_slots.to(device=device, dtype=torch.long)
        src = table[kept // self.block_size] * self.block_size + kept % self.block_size
        positions = torch.arange(num_kept, device=device)
        dst = table[positions // self.block_size] * self.block_size + positions % self.block_size
        for layer, caches in enumerate(kv_caches):
            for cache in caches:
                flat = cache.view(-1, *cache.shape[2:])  # (num_slots, num_kv_heads, head_dim)
                # The right-hand side is gathered into a new tensor before anything is written, so
                # sources that later destinations overwrite (dst[j] <= src[j]) are read intact.
                if src.dim() == 2:
                    flat[dst] = flat[src[layer]]
                else:  # per kv-head selection: head h of slot j comes from head h of slot src[l, h, j]
                    heads = torch.arange(flat.shape[1], device=device)[:, None]
                    flat[dst[None, :], heads] = flat[src[layer], heads]
        request.num_evicted_tokens += request.num_cached_tokens - num_kept
        request.num_ring_evictions = 0  # kept slots are stored in the order given (position order)
        freed = block_ids[self.num_blocks_for(num_kept) :]
        del block_ids[self.num_blocks_for(num_kept) :]  # the live list scheduled steps hold
        self.pool.free(freed[::-1])
        return len(freed)

    def _ensure_hashes(self, request: Request, num_full_blocks: int) -> None:
        hashes = request.block_hashes
        for i in range(len(hashes), num_full_blocks):
            tokens = tuple(request.token_ids_slice(i * self.block_size, (i + 1) * self.block_size))
            hashes.append(self.hash_fn(hashes[-1] if hashes else None, tokens))
