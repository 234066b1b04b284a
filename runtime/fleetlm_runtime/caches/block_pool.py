"""The KV pool's blocks: which are free, who shares which, and which hold a cached prompt prefix.

vLLM v1's `BlockPool`, in pure Python (no torch: the tensors live in `engine/runner.py`, one slab per
layer allocated at start; a block id is an index into it). Vocabulary:

* `get_new_blocks(n)`: take n blocks from the head of the free queue (reference count 1). A free block
  may still hold a cached prefix; handing it out evicts it from the cache then (lazy eviction), so
  cached blocks cost nothing until the memory is needed.
* `touch(blocks)`: a prefix-cache hit; the blocks gain a reference (and leave the free queue if they
  were free). Several requests then read the same KV: sharing, never copying.
* `refresh(blocks)`: a chain (root first) was used now; with `max_cached_blocks`, the index bound
  evicts the least recently used hash, and this keeps a chain's root more recent than its tail, so the
  bound trims chains from their leaves (a request's unique question block goes before the shared system
  prompt's first block). Evicting a root would strand every block after it: a lookup walks the chain
  from its root and stops at the first miss.
* `free_blocks(blocks)`: drop one reference each; a block reaching zero joins the free queue. Blocks
  holding a cached prefix go to the tail (evicted last, in the order given), plain ones to the head
  (reused first), so freeing never throws away reusable KV while plain free blocks remain.
* `cache_block(block, hash)`: the block's tokens are now computed; later prompts with the same chain
  hash can share it.

The free queue is an `OrderedDict` used as a doubly linked list: O(1) append at either end, pop from the
head and removal from the middle (a hit on a free cached block), which a `deque` cannot do (vLLM's
`FreeKVCacheBlockQueue` exists for the same reason). Block 0 is the null block: never handed out, it
stays zero and pads block tables, so a padded lookup reads finite values that attention masks out.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence

NULL_BLOCK = 0


class BlockPool:
    def __init__(self, *, num_blocks: int, enable_caching: bool = True, max_cached_blocks: int | None = None) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (one is the null block), got {num_blocks}")
        if max_cached_blocks is not None and max_cached_blocks < 1:
            raise ValueError(f"max_cached_blocks must be None or >= 1, got {max_cached_blocks}")
        self.num_blocks = num_blocks  # including the null block
        self.enable_caching = enable_caching
        self.max_cached_blocks = max_cached_blocks  # None: bounded by the pool only
        self.ref_cnt = [0] * num_blocks
        self.ref_cnt[NULL_BLOCK] = 1  # held forever
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(1, num_blocks))
        # hash -> block, least recently used first (insertion or hit moves an entry to the end).
        self._cached: collections.OrderedDict[bytes, int] = collections.OrderedDict()

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now, cached ones included (they are evicted on the way)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by requests, in [0, 1] (free cached blocks count as free)."""
        return 1.0 - len(self._free) / self.num_usable_blocks

    def get_cached_block(self, block_hash: bytes) -> int | None:
        return self._cached.get(block_hash)

    def get_new_blocks(self, num_blocks: int) -> list[int]:
        if num_blocks > len(self._free):
            raise ValueError(f"asked for {num_blocks} blocks, {len(self._free)} are free")
        free, ref_cnt, hashes = self._free, self.ref_cnt, self.block_hash
        blocks: list[int] = []
        for _ in range(num_blocks):
            block, _ = free.popitem(last=False)
            if hashes[block] is not None:
                self._uncache(block)
            ref_cnt[block] = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: Sequence[int]) -> None:
        """A hit on `blocks` (a chain, root first): one more reference each, most recently used root last."""
        free, ref_cnt, hashes, cached = self._free, self.ref_cnt, self.block_hash, self._cached
        for block in reversed(blocks):
            if ref_cnt[block] == 0:
                del free[block]
            ref_cnt[block] += 1
            block_hash = hashes[block]
            if block_hash is not None:
                cached.move_to_end(block_hash)

    def refresh(self, blocks: Sequence[int]) -> None:
        """Mark the indexed ones of `blocks` (a chain, root first) most recently used, the root last."""
        hashes, cached = self.block_hash, self._cached
        for block in reversed(blocks):
            block_hash = hashes[block]
            if block_hash is not None:
                cached.move_to_end(block_hash)

    def free_blocks(self, ordered_blocks: Iterable[int]) -> None:
        """Drop one reference from each block; those freed with a cached prefix are evicted in this order."""
        free, ref_cnt, hashes = self._free, self.ref_cnt, self.block_hash
        for block in ordered_blocks:
            ref_cnt[block] -= 1
            if ref_cnt[block] == 0:
                free[block] = None
                if hashes[block] is None:
                    free.move_to_end(block, last=False)

    def cache_block(self, block: int, block_hash: bytes) -> bool:
        """Index `block` (computed, held by a request) under `block_hash`; False if caching is off, the
        block is already indexed, or another block holds that prefix (this one then stays private)."""
        if not self.enable_caching or self.block_hash[block] is not None or block_hash in self._cached:
            return False
        if self.max_cached_blocks is not None and len(self._cached) >= self.max_cached_blocks:
            _, oldest = self._cached.popitem(last=False)
            self._forget(oldest)
        self._cached[block_hash] = block
        self.block_hash[block] = block_hash
        return True

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (their KV may be wrong after a failed step); returns how many."""
        dropped = len(self._cached)
        for block in list(self._cached.values()):
            self._forget(block)
        self._cached.clear()
        return dropped

    def _uncache(self, block: int) -> None:
        block_hash = self.block_hash[block]
        assert block_hash is not None
        del self._cached[block_hash]
        self.block_hash[block] = None

    def _forget(self, block: int) -> None:
        # Dropped from the index (the caller removed the map entry): now a plain block. If free, it
        # moves to the head of the queue, to be reused before blocks that still hold a prefix.
        self.block_hash[block] = None
        if self.ref_cnt[block] == 0:
            self._free.move_to_end(block, last=False)
