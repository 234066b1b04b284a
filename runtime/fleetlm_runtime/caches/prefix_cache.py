"""Prefix-cache index: which prompt blocks have reusable KV, bounded in tokens, least recently used out.

vLLM-style block hashing: a prompt is cut into full blocks of `block_size` tokens and block i is named
by `sha256(hash(block i-1) + its tokens)`, so a hash names the whole prefix up to the end of its block
(two prompts share block i's hash only if they share every token before it). Only full blocks are
cached. SHA-256 rather than Python's `hash()`: a collision would silently serve another prompt's KV.

This module is bookkeeping only (pure Python, no torch): the scheduler decides here what is cached and
what is evicted, and the runner mirrors those decisions on its KV copies (`runner.py`), so the two can
never disagree about which blocks exist. Blocks committed in a step become visible to lookups only from
the next schedule() on, after the runner has copied their KV out of the request's slot.
"""

from __future__ import annotations

import array
import collections
import hashlib
from collections.abc import Sequence

_ROOT = b"fleetlm-prefix-cache-v1"


def block_hashes(token_ids: Sequence[int], block_size: int, *, start: int = 0, parent: bytes = _ROOT) -> list[bytes]:
    """Chain hashes of the full blocks of `token_ids` from block `start` on (`parent`: block start-1's)."""
    hashes: list[bytes] = []
    for i in range(start, len(token_ids) // block_size):
        block = array.array("q", token_ids[i * block_size : (i + 1) * block_size]).tobytes()
        parent = hashlib.sha256(parent + block).digest()
        hashes.append(parent)
    return hashes


def root_hash() -> bytes:
    return _ROOT


class PrefixCacheIndex:
    """Cached block hashes in LRU order (oldest first), bounded by `max_tokens`."""

    def __init__(self, *, max_tokens: int, block_size: int = 16) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if max_tokens < block_size:
            raise ValueError(f"max_tokens must hold at least one block of {block_size} tokens, got {max_tokens}")
        self.block_size = block_size
        self.max_blocks = max_tokens // block_size
        self._blocks: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._evicted: dict[bytes, None] = {}  # since the last take_evicted(), in eviction order

    @property
    def max_tokens(self) -> int:
        return self.max_blocks * self.block_size

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def num_tokens(self) -> int:
        return len(self._blocks) * self.block_size

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._blocks

    def match(self, hashes: Sequence[bytes]) -> int:
        """Number of leading blocks of `hashes` that are cached; those become the most recently used.

        They are touched last block first, so the chain's root ends up the most recent: when space runs
        out the longest tails go first and the shared roots stay (vLLM frees blocks in reverse order for
        the same reason)."""
        blocks = self._blocks
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        for h in reversed(hashes[:n]):
            blocks.move_to_end(h)
        return n

    def insert(self, hashes: Sequence[bytes]) -> set[bytes]:
        """Record a chain of blocks (from its root) as cached and most recently used, root last; evicts
        the least recently used beyond the budget. Returns the hashes that were not cached before."""
        blocks = self._blocks
        new: set[bytes] = set()
        for h in reversed(hashes):
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
                new.add(h)
                self._evicted.pop(h, None)  # evicted and cached again in the same step: it stays
        while len(blocks) > self.max_blocks:
            old, _ = blocks.popitem(last=False)
            self._evicted[old] = None
        return new

    def take_evicted(self) -> list[bytes]:
        """Blocks evicted since the previous call: the runner drops their KV copies."""
        evicted = list(self._evicted)
        self._evicted.clear()
        return evicted

    def clear(self) -> list[bytes]:
        """Forget everything (e.g. after a failed step); returns every hash that was cached or evicted."""
        dropped = [*self._evicted, *self._blocks]
        self._blocks.clear()
        self._evicted.clear()
        return dropped
