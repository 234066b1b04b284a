"""KV-cache accounting in tokens: who holds how much of the configured capacity.

This is bookkeeping only. The tensors live in `engine/runner.py`; this module must never import torch.
Admission reserves a request's worst case (prompt + max_tokens) up front, as TGI does on its padded
path, so a running request can never run out of room; room for a higher class is made by preempting
(the scheduler frees a lower one's reservation). `free()` returns the
whole reservation at once, which is what makes abort and finish release KV immediately.
"""

from __future__ import annotations


class KVCacheManager:
    def __init__(self, *, capacity_tokens: int) -> None:
        if capacity_tokens < 1:
            raise ValueError(f"capacity_tokens must be >= 1, got {capacity_tokens}")
        self._capacity = capacity_tokens
        self._reserved: dict[str, int] = {}
        self._num_reserved = 0

    @property
    def capacity_tokens(self) -> int:
        return self._capacity

    @property
    def num_reserved_tokens(self) -> int:
        return self._num_reserved

    @property
    def num_free_tokens(self) -> int:
        return self._capacity - self._num_reserved

    @property
    def usage(self) -> float:
        """Reserved fraction of capacity, in [0, 1]; what admission sees."""
        return self._num_reserved / self._capacity

    @property
    def num_requests(self) -> int:
        return len(self._reserved)

    def reserved_by(self, req_id: str) -> int:
        return self._reserved.get(req_id, 0)

    def can_allocate(self, num_tokens: int) -> bool:
        return self._num_reserved + num_tokens <= self._capacity

    def allocate(self, req_id: str, num_tokens: int) -> bool:
        """Reserve `num_tokens` for `req_id`; False (and nothing reserved) when they do not fit."""
        if req_id in self._reserved:
            raise ValueError(f"request {req_id!r} already holds KV")
        if not self.can_allocate(num_tokens):
            return False
        self._reserved[req_id] = num_tokens
        self._num_reserved += num_tokens
        return True

    def free(self, req_id: str) -> int:
        """Release everything `req_id` holds; returns the number of tokens freed (0 if none)."""
        num_tokens = self._reserved.pop(req_id, 0)
        self._num_reserved -= num_tokens
        return num_tokens

    def set_capacity(self, capacity_tokens: int) -> None:
        """Change the capacity live; reservations above it stay until their requests finish."""
        if capacity_tokens < 1:
            raise ValueError(f"capacity_tokens must be >= 1, got {capacity_tokens}")
        self._capacity = capacity_tokens
