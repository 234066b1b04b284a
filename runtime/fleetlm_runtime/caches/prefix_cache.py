"""Prefix-cache block names: chain hashes of a prompt's full blocks.

vLLM-style block hashing: a prompt is cut into full blocks of `block_size` tokens and block i is named
by `sha256(hash(block i-1) + its tokens)`, so a hash names the whole prefix up to the end of its block
(two prompts share block i's hash only if they share every token before it). Only full blocks are
cached. SHA-256 rather than Python's `hash()`: a collision would silently serve another prompt's KV.

The cache itself is the KV pool (`block_pool.py`): a hash names a block of the pool that any number of
requests can share, and free cached blocks are evicted lazily, least recently used first, when the pool
needs them. Pure Python, no torch.
"""

from __future__ import annotations

import array
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
