"""KV-cache accounting in blocks: which blocks each request holds, and prefix sharing.

vLLM v1's `KVCacheManager`, the only KV interface the scheduler sees: `get_computed_blocks(request)`
(the longest cached prefix of its prompt), `allocate_slots(request, num_new_tokens, computed_blocks)`
(blocks for the tokens about to be computed, or None when the pool cannot hold them: the scheduler then
preempts), `free(request_id)` and `usage`. A request holds exactly the blocks its computed tokens fill,
so the pool serves sequences by the tokens they actually hold, not by their worst case.

Bookkeeping only, over a `BlockPool`; this module must never import torch. Prompt blocks are indexed in
the prefix cache when the step that computes them is scheduled (the scheduler calls `cache_blocks` before
that step's admissions, so a request admitted in the same step shares them: every token's KV is written
before any attention reads the pool, layer by layer); a failed step resets the cache
(`reset_prefix_cache`). With a bounded index, a chain's blocks are kept in least-recently-used order
from its tail to its root (`BlockPool.refresh`), so the bound trims chains from their leaves.
"""

from __future__ import annotations

from fleetlm_runtime.caches import block_pool
from fleetlm_runtime.engine import request as request_mod


class KVCacheManager:
    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = False,
        max_cached_blocks: int | None = None,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = block_pool.BlockPool(
            num_blocks=num_blocks, enable_caching=enable_caching, max_cached_blocks=max_cached_blocks
        )
        self._blocks: dict[str, list[int]] = {}  # request -> its block table, in token order
        self._num_hashed: dict[str, int] = {}  # request -> leading blocks already offered to the cache

    # ----------------------------------------------------------------------------------------------
    # Sizes

    @property
    def num_blocks(self) -> int:
        """Blocks requests can hold (the null block excluded)."""
        return self.pool.num_usable_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_usable_blocks * self.block_size

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_usable_blocks - self.pool.num_free_blocks

    @property
    def num_used_tokens(self) -> int:
        """Token capacity of the blocks in use (whole blocks: what they take from the pool)."""
        return self.num_used_blocks * self.block_size

    @property
    def usage(self) -> float:
        """Blocks in use / usable blocks, in [0, 1]."""
        return self.pool.usage

    @property
    def num_requests(self) -> int:
        return len(self._blocks)

    def block_ids(self, req_id: str) -> list[int]:
        """The request's block table (the manager's own list: read it, do not change it)."""
        return self._blocks.get(req_id, [])

    def num_blocks_held(self, req_id: str) -> int:
        return len(self._blocks.get(req_id, ()))

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ----------------------------------------------------------------------------------------------
    # The scheduler's calls

    def get_computed_blocks(self, req: request_mod.Request) -> list[int]:
        """Blocks holding the longest cached prefix of the prompt (whole blocks). At least one token is
        always left to compute: the step must produce the logits of the next token."""
        if not self.enable_caching or req.block_hashes is None:
            return []
        pool = self.pool
        hit: list[int] = []
        for block_hash in req.block_hashes[: (req.num_tokens - 1) // self.block_size]:
            block = pool.get_cached_block(block_hash)
            if block is None:
                break
            hit.append(block)
        return hit

    def allocate_slots(
        self, req: request_mod.Request, num_new_tokens: int, computed_blocks: list[int] | None = None
    ) -> list[int] | None:
        """Make room for `num_new_tokens` more tokens after `req.num_computed_tokens` (plus, on admission,
        the cached `computed_blocks`, which are shared). Returns the blocks newly taken from the pool
        (often none), or None, taking nothing, when they do not fit."""
        blocks = self._blocks.get(req.req_id)
        held = len(blocks) if blocks is not None else 0
        num_computed = len(computed_blocks) if computed_blocks else 0
        total_tokens = req.num_computed_tokens + num_computed * self.block_size + num_new_tokens
        needed = -(-total_tokens // self.block_size) - held - num_computed
        if needed <= 0 and not num_computed:
            return []
        pool = self.pool
        free = pool.num_free_blocks
        if computed_blocks:
            # Cached blocks that are free now stop being free once shared: they are not room for new ones.
            free -= sum(1 for block in computed_blocks if pool.ref_cnt[block] == 0)
        if needed > free:
            return None
        if blocks is None:
            blocks = self._blocks[req.req_id] = []
        if computed_blocks:
            pool.touch(computed_blocks)
            blocks.extend(computed_blocks)
            self._num_hashed[req.req_id] = len(blocks)
        new = pool.get_new_blocks(needed) if needed > 0 else []
        blocks.extend(new)
        return new

    def cache_blocks(self, req: request_mod.Request, num_tokens: int) -> None:
        """The first `num_tokens` of the prompt are (being) computed: index their full blocks."""
        if not self.enable_caching or req.block_hashes is None:
            return
        blocks = self._blocks.get(req.req_id)
        if blocks is None:
            return
        pool = self.pool
        bound = pool.max_cached_blocks
        bounded = bound is not None
        start = self._num_hashed.get(req.req_id, 0)
        end = min(num_tokens // self.block_size, len(req.block_hashes), len(blocks))
        if bound is not None:
            # A chain longer than the bound keeps its head: deeper blocks would push out its own root.
            end = min(end, bound)
        if end <= start:
            return
        hashes = req.block_hashes
        if bounded and start:
            pool.refresh(blocks[:start])  # the bound evicts for the new blocks; not this chain's own root
        for i in range(start, end):
            if i and pool.get_cached_block(hashes[i - 1]) is None:
                end = i  # its parent left the index: no lookup could reach this block
                break
            pool.cache_block(blocks[i], hashes[i])
        if bounded:
            pool.refresh(blocks[:end])
        self._num_hashed[req.req_id] = end

    def free(self, req_id: str) -> int:
        """Release every block `req_id` holds (shared ones stay with their other holders); returns how
        many it held. The tail goes first, so under pressure a cached chain loses its end, not its root."""
        blocks = self._blocks.pop(req_id, None)
        self._num_hashed.pop(req_id, None)
        if not blocks:
            return 0
        self.pool.free_blocks(reversed(blocks))
        return len(blocks)

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()
        for req_id, blocks in self._blocks.items():
            self._num_hashed[req_id] = len(blocks)  # nothing held now is offered to the cache again
