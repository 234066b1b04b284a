"""Waiting-request queues behind one small interface, so the admission order is pluggable.

Today there are two policies, as in vLLM: `fcfs` (arrival order) and `priority` (lower `priority` value
first, ties by arrival). The QoS issue adds per-class queues with aging or fair-share behind the same
`RequestQueue` interface; the scheduler only calls the methods below. Pure Python: no torch, no I/O.
"""

from __future__ import annotations

import abc
import collections
import heapq
import itertools
from collections.abc import Iterable, Iterator
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
    """A heap on (priority, arrival time, insertion order); the counter keeps ties FIFO and stable."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, request_mod.Request]] = []
        self._counter = itertools.count()

    def add(self, req: request_mod.Request) -> None:
        heapq.heappush(self._heap, (req.priority, req.arrival_time_s, next(self._counter), req))

    def prepend(self, req: request_mod.Request) -> None:
        # A negative counter puts it ahead of every request of equal priority and arrival.
        heapq.heappush(self._heap, (req.priority, req.arrival_time_s, -next(self._counter), req))

    def peek(self) -> request_mod.Request:
        return self._heap[0][3]

    def pop(self) -> request_mod.Request:
        return heapq.heappop(self._heap)[3]

    def remove_many(self, req_ids: set[str]) -> list[request_mod.Request]:
        # Aborts are rare next to steps; an O(n) rebuild keeps the heap simple and exact.
        removed = [entry[3] for entry in self._heap if entry[3].req_id in req_ids]
        if removed:
            self._heap = [entry for entry in self._heap if entry[3].req_id not in req_ids]
            heapq.heapify(self._heap)
        return removed

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[request_mod.Request]:
        return (entry[3] for entry in self._heap)


def create_queue(policy: SchedulingPolicy, requests: Iterable[request_mod.Request] = ()) -> RequestQueue:
    queue: RequestQueue
    if policy == "fcfs":
        queue = FCFSQueue()
    elif policy == "priority":
        queue = PriorityQueue()
    else:
        raise ValueError(f"unknown scheduling policy {policy!r}; expected 'fcfs' or 'priority'")
    for req in requests:
        queue.add(req)
    return queue
