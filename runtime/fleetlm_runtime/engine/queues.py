"""Waiting-request queues behind one small interface, so the admission order is pluggable.

Two policies, as in vLLM: `fcfs` (arrival order) and `priority` (lower `priority` value first, ties by
arrival, with aging so lower classes are not starved). The scheduler only calls the methods below. Pure
Python: no torch, no I/O.
"""

from __future__ import annotations

import abc
import collections
import heapq
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

from fleetlm_runtime.engine import request as request_mod

SchedulingPolicy = Literal["fcfs", "priority"]


class RequestQueue(abc.ABC):
    """Waiting requests in admission order. `peek`/`pop` give the next one to admit."""

    @abc.abstractmethod
    def add(self, req: request_mod.Request) -> None:
        """Queue a newly arrived request."""

    @abc.abstractmethod
    def prepend(self, req: request_mod.Request) -> None:
        """Put a request back so it is admitted before the others of its rank (e.g. after preemption)."""

    @abc.abstractmethod
    def peek(self) -> request_mod.Request:
        """The next request to admit; raises IndexError when empty."""

    @abc.abstractmethod
    def pop(self) -> request_mod.Request:
        """Remove and return the next request to admit; raises IndexError when empty."""

    @abc.abstractmethod
    def remove_many(self, req_ids: set[str]) -> list[request_mod.Request]:
        """Remove the requests with these ids (aborts); returns those that were queued."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def __iter__(self) -> Iterator[request_mod.Request]:
        """All queued requests, in no guaranteed order (used for statistics)."""


class FCFSQueue(RequestQueue):
    def __init__(self) -> None:
        self._items: collections.deque[request_mod.Request] = collections.deque()

    def add(self, req: request_mod.Request) -> None:
        self._items.append(req)

    def prepend(self, req: request_mod.Request) -> None:
        self._items.appendleft(req)

    def peek(self) -> request_mod.Request:
        return self._items[0]

    def pop(self) -> request_mod.Request:
        return self._items.popleft()

    def remove_many(self, req_ids: set[str]) -> list[request_mod.Request]:
        removed = [r for r in self._items if r.req_id in req_ids]
        if removed:
            self._items = collections.deque(r for r in self._items if r.req_id not in req_ids)
        return removed

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[request_mod.Request]:
        return iter(self._items)


class PriorityQueue(RequestQueue):
    """One FIFO per priority value; the next request is the head with the best *effective* priority.

    Effective priority = `priority - waited_s / aging_s` (lower runs sooner): a request gains one
    priority level for every `aging_s` seconds it waits, so a low class behind a steady stream of high
    ones is admitted after at most about `(its priority - theirs) * aging_s` seconds (aging against
    starvation; `aging_s=None` turns it off: strict priority). Within a priority value the order is
    arrival (then insertion); `prepend` puts a request ahead of every other of its priority (the
    preempted keep their place). Only the heads are compared, so `peek` is O(number of priorities).
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, aging_s: float | None = None) -> None:
        if aging_s is not None and not aging_s > 0:
            raise ValueError(f"aging_s must be None or > 0, got {aging_s!r}")
        # priority -> heap of (0 if prepended else 1, arrival time, insertion order, request)
        self._buckets: dict[int, list[tuple[int, float, int, request_mod.Request]]] = {}
        self._counter = itertools.count()
        self._len = 0
        self._clock = clock
        self._aging_s = aging_s

    def effective_priority(self, req: request_mod.Request, now: float | None = None) -> float:
        if self._aging_s is None:
            return float(req.priority)
        now = self._clock() if now is None else now
        return req.priority - max(0.0, now - req.arrival_time_s) / self._aging_s

    def _push(self, req: request_mod.Request, rank: int) -> None:
        bucket = self._buckets.get(req.priority)
        if bucket is None:
            bucket = self._buckets[req.priority] = []
        heapq.heappush(bucket, (rank, req.arrival_time_s, next(self._counter), req))
        self._len += 1

    def add(self, req: request_mod.Request) -> None:
        self._push(req, 1)

    def prepend(self, req: request_mod.Request) -> None:
        self._push(req, 0)

    def _best(self) -> int:
        buckets = self._buckets
        if len(buckets) == 1:
            return next(iter(buckets))
        if not buckets:
            raise IndexError("peek from an empty queue")
        if self._aging_s is None:
            return min(buckets)
        now, aging_s = self._clock(), self._aging_s
        return min(buckets, key=lambda p: (p - max(0.0, now - buckets[p][0][1]) / aging_s, p))

    def peek(self) -> request_mod.Request:
        return self._buckets[self._best()][0][3]

    def pop(self) -> request_mod.Request:
        priority = self._best()
        bucket = self._buckets[priority]
        req = heapq.heappop(bucket)[3]
        if not bucket:
            del self._buckets[priority]
        self._len -= 1
        return req

    def remove_many(self, req_ids: set[str]) -> list[request_mod.Request]:
        # Aborts are rare next to steps; an O(n) rebuild keeps the heaps simple and exact.
        removed: list[request_mod.Request] = []
        for priority, bucket in list(self._buckets.items()):
            gone = [entry[3] for entry in bucket if entry[3].req_id in req_ids]
            if not gone:
                continue
            removed.extend(gone)
            kept = [entry for entry in bucket if entry[3].req_id not in req_ids]
            if kept:
                heapq.heapify(kept)
                self._buckets[priority] = kept
            else:
                del self._buckets[priority]
        self._len -= len(removed)
        return removed

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[request_mod.Request]:
        return (entry[3] for bucket in self._buckets.values() for entry in bucket)


def create_queue(
    policy: SchedulingPolicy,
    requests: Iterable[request_mod.Request] = (),
    *,
    clock: Callable[[], float] = time.monotonic,
    aging_s: float | None = None,
) -> RequestQueue:
    queue: RequestQueue
    if policy == "fcfs":
        queue = FCFSQueue()
    elif policy == "priority":
        queue = PriorityQueue(clock=clock, aging_s=aging_s)
    else:
        raise ValueError(f"unknown scheduling policy {policy!r}; expected 'fcfs' or 'priority'")
    for req in requests:
        queue.add(req)
    return queue
