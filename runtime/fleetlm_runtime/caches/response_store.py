"""The response cache's store: exact repeats of deterministic requests answered from memory, computed once.

Only a request whose output is fixed by its inputs may be served from here: greedy decoding
(temperature 0, or top_k 1) or an explicit seed. The key is a SHA-256 over everything that decides the
output: the model (id, source, revision, dtype, context), the rendered prompt's token ids, every sampling
parameter (max_tokens, temperature, top_p, top_k, seed, stop strings, stop token ids, ignore_eos, ...),
and a salt that keeps tenants apart. Only the digest is kept, never the prompt.

The store is an LRU bounded twice, by entries and by bytes, and every entry expires `ttl_s` after it was
stored (a hit refreshes its recency, not its age). On top sits single-flight: `claim(key)` makes the first
caller of a key the *leader*, who computes and must `finish()` with the result or None; callers that come
while it runs are *followers* who await that result. A leader that fails, is aborted or is cancelled
finishes with None, so its followers wake with nothing and claim again (one of them leads next): a failure
is never cached and never handed on as an answer. `clear()` empties the store and forgets the flights
under way, so nothing computed under an old model or config is stored after it.

Pure Python (asyncio futures for the flights); the clock is injectable for the TTL. This module must
never import torch, aiohttp, the engine or the server: the server adapts requests to keys and replays.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# Rough fixed cost of one entry besides its text: the key, the OrderedDict slot, the dataclass.
ENTRY_OVERHEAD_BYTES = 256
PIECE_OVERHEAD_BYTES = 56  # one str object per text piece


@dataclasses.dataclass(frozen=True, slots=True)
class CachedResponse:
    """A finished generation, as the engine streamed it: enough to replay it as JSON or as SSE."""

    pieces: tuple[str, ...]  # [num_chunks] text deltas in the order they were produced
    finish_reason: str  # "stop" | "length": only natural ends are cached
    num_prompt_tokens: int
    num_output_tokens: int

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def size_bytes(self) -> int:
        """What this entry costs the byte bound (an estimate on the safe side)."""
        text_bytes = sum(len(piece.encode("utf-8", "surrogatepass")) for piece in self.pieces)
        return ENTRY_OVERHEAD_BYTES + text_bytes + PIECE_OVERHEAD_BYTES * len(self.pieces)


def is_deterministic(*, temperature: float, top_k: int, seed: int | None) -> bool:
    """Whether a request's output is fixed by its inputs: greedy, or sampled from an explicit seed."""
    return temperature == 0.0 or top_k == 1 or seed is not None


def make_key(
    *,
    model: Mapping[str, Any],
    prompt_token_ids: Sequence[int],
    sampling: Mapping[str, Any],
    salt: str = "",
) -> str:
    """The cache key: a hex SHA-256 over a canonical JSON of every part (sorted keys, no spaces).

    `model` and `sampling` must hold only JSON values; any field added to either later becomes part of
    the key without a change here, so a new sampling parameter can never be silently ignored.
    """
    canonical = json.dumps(
        {"model": model, "prompt": list(prompt_token_ids), "sampling": sampling, "salt": salt},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=False,
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


@dataclasses.dataclass(slots=True)
class _Entry:
    value: CachedResponse
    stored_at_s: float
    size_bytes: int


@dataclasses.dataclass(frozen=True, slots=True)
class Hit:
    value: CachedResponse


class Follower:
    """A caller whose key is being computed by another: `await wait()` gives the leader's result, or None
    when the leader ended without one (then claim again). Cancelling the waiter never cancels the flight."""

    __slots__ = ("_future",)

    def __init__(self, future: asyncio.Future[CachedResponse | None]) -> None:
        self._future = future

    async def wait(self) -> CachedResponse | None:
        return await asyncio.shield(self._future)


class Leader:
    """The caller that computes a key. It must call `finish()` exactly once, whatever happens (use
    try/finally): with the response to store and hand to its followers, or None on failure or abort."""

    __slots__ = ("_cache", "_done", "_future", "_generation", "key")

    def __init__(
        self, cache: ResponseCache, key: str, future: asyncio.Future[CachedResponse | None], generation: int
    ) -> None:
        self._cache = cache
        self.key = key
        self._future = future
        self._generation = generation
        self._done = False

    def finish(self, value: CachedResponse | None) -> None:
        if self._done:
            return
        self._done = True
        self._cache._land(self.key, self._future, self._generation, value)
        if not self._future.done():
            self._future.set_result(value)


Claim = Hit | Leader | Follower


class ResponseCache:
    """LRU + TTL store of `CachedResponse`s with single-flight claims. Used from one event loop."""

    def __init__(
        self,
        *,
        max_entries: int,
        max_bytes: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1 or max_bytes < 1 or not ttl_s > 0:
            raise ValueError("max_entries, max_bytes and ttl_s must be positive")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()  # LRU first
        self._num_bytes = 0
        self._flights: dict[str, asyncio.Future[CachedResponse | None]] = {}
        self._generation = 0  # bumped by clear(): leaders from before it store nothing
        self.num_evictions = 0
        self.num_expirations = 0

    # ----------------------------------------------------------------------------------------------
    # The store

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_bytes(self) -> int:
        return self._num_bytes

    @property
    def num_flights(self) -> int:
        return len(self._flights)

    def get(self, key: str) -> CachedResponse | None:
        """The live entry for `key` (now the most recently used), or None; an expired one is dropped."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() - entry.stored_at_s >= self.ttl_s:
            self._remove(key)
            self.num_expirations += 1
            return None
        self._entries.move_to_end(key)
        return entry.value

    def put(self, key: str, value: CachedResponse) -> bool:
        """Store `value`, evicting expired then least recently used entries until both bounds hold.
        An entry larger than the whole byte bound is not stored (returns False)."""
        size = value.size_bytes
        if size > self.max_bytes:
            return False
        if key in self._entries:
            self._remove(key)
        self._entries[key] = _Entry(value=value, stored_at_s=self._clock(), size_bytes=size)
        self._num_bytes += size
        if len(self._entries) > self.max_entries or self._num_bytes > self.max_bytes:
            self._drop_expired()
        while len(self._entries) > self.max_entries or self._num_bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._remove(oldest)
            self.num_evictions += 1
        return True

    def clear(self) -> None:
        """Forget every entry and every flight under way (model or config changed). Waiting followers
        still get their leader's result; the leader's result is no longer stored."""
        self._entries.clear()
        self._num_bytes = 0
        self._flights.clear()
        self._generation += 1

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._num_bytes -= entry.size_bytes

    def _drop_expired(self) -> None:
        now = self._clock()
        expired = [k for k, e in self._entries.items() if now - e.stored_at_s >= self.ttl_s]
        for key in expired:
            self._remove(key)
        self.num_expirations += len(expired)

    # ----------------------------------------------------------------------------------------------
    # Single flight

    def claim(self, key: str) -> Claim:
        """A hit, or the right to compute `key` (leader), or a place behind the one computing it."""
        value = self.get(key)
        if value is not None:
            return Hit(value)
        flight = self._flights.get(key)
        if flight is not None and not flight.done():
            return Follower(flight)
        future: asyncio.Future[CachedResponse | None] = asyncio.get_running_loop().create_future()
        self._flights[key] = future
        return Leader(self, key, future, self._generation)

    def _land(
        self, key: str, future: asyncio.Future[CachedResponse | None], generation: int, value: CachedResponse | None
    ) -> None:
        # Called by Leader.finish (the cache and its leaders are one unit).
        if self._flights.get(key) is future:
            del self._flights[key]
        if value is not None and generation == self._generation:
            self.put(key, value)
