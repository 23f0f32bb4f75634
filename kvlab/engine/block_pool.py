"""Physical KV blocks: reference counts, an LRU free queue and a prefix cache of full blocks.

A full block can be cached under the hash of its tokens chained with its parent's hash, so that a
later request with the same prefix reuses it without recomputation. A hash only finds a candidate;
a hit is exact because a block also records its own token ids and the identity of its parent block
(id plus generation, which changes whenever the block is reused), and the lookup compares both.
By induction from the first block, a verified hit has exactly the queried prefix, so a hash
collision can cost a miss but never a wrong hit.

Freed blocks go to the free queue; cached ones keep their contents (and cache entry) until they are
reallocated, least recently freed first. Blocks that hold nothing reusable are reallocated first.
"""

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

HashFn = Callable[[int | None, tuple[int, ...]], int]


def hash_block_tokens(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Chained block hash. Python's hash is fast and stable within a process, which is all a
    per-process prefix cache needs; collisions are harmless because hits are verified."""
    return hash((parent_hash, token_ids))


@dataclass(frozen=True, slots=True)
class BlockIdentity:
    """Names one incarnation of a physical block: the id alone is reused after eviction."""

    block_id: int
    generation: int


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    generation: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None
    parent: BlockIdentity | None = None

    @property
    def identity(self) -> BlockIdentity:
        return BlockIdentity(self.block_id, self.generation)

    @property
    def is_cached(self) -> bool:
        return self.token_ids is not None


class BlockPool:
    def __init__(self, num_blocks: int, hash_fn: HashFn = hash_block_tokens):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.hash_fn = hash_fn
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Front = next to reallocate. Values unused: OrderedDict gives O(1) removal from the middle
        # (a prefix hit revives a free cached block).
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block_id: dict[int, int] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def allocate(self, num_blocks: int) -> list[int] | None:
        """Take fresh blocks (ref count 1), evicting their cached contents; None if too few are free."""
        if num_blocks > len(self.free_queue):
            return None
        block_ids = []
        for _ in range(num_blocks):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.is_cached:
                self.num_evictions += 1
            self._uncache(block)
            block.generation += 1
            block.ref_count = 1
            block_ids.append(block_id)
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Share blocks found in the prefix cache: one more reference each, revived if free."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block; pass a request's blocks last-first so that the tail of a
        prefix (least likely to be shared) is evicted before its head."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count < 1:
                raise RuntimeError(f"block {block_id} freed more often than allocated")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                if not block.is_cached:
                    self.free_queue.move_to_end(block_id, last=False)

    def cache_block(
        self, block_id: int, block_hash: int, token_ids: tuple[int, ...], parent: BlockIdentity | None
    ) -> None:
        """Publish a full block under `block_hash`. A different block already under that hash (a
        duplicate computed concurrently, or a collision) is displaced from the index, not evicted."""
        block = self.blocks[block_id]
        if block.is_cached:
            return
        block.block_hash, block.token_ids, block.parent = block_hash, token_ids, parent
        self.hash_to_block_id[block_hash] = block_id

    def lookup(self, block_hash: int, token_ids: tuple[int, ...], parent: BlockIdentity | None) -> int | None:
        """The cached block holding exactly `token_ids` after `parent`, or None."""
        block_id = self.hash_to_block_id.get(block_hash)
        if block_id is None:
            return None
        block = self.blocks[block_id]
        if block.token_ids != token_ids or block.parent != parent:
            return None
        return block_id

    def _uncache(self, block: Block) -> None:
        if block.block_hash is not None and self.hash_to_block_id.get(block.block_hash) == block.block_id:
            del self.hash_to_block_id[block.block_hash]
        block.block_hash, block.token_ids, block.parent = None, None, None

    def check_invariants(self) -> None:
        """For tests: free blocks are exactly those with no reference; the index points at cached blocks."""
        free = set(self.free_queue)
        for block in self.blocks:
            if block.ref_count < 0 or (block.ref_count == 0) != (block.block_id in free):
                raise AssertionError(
                    f"block {block.block_id}: ref_count {block.ref_count}, free={block.block_id in free}"
                )
        for block_hash, block_id in self.hash_to_block_id.items():
            if self.blocks[block_id].block_hash != block_hash:
                raise AssertionError(f"hash index points at block {block_id}, which holds another hash")
