"""Waiting-request queues behind one small interface, so the admission order is pluggable.

Two policies: `fcfs` (arrival order, as in vLLM) and `priority` (lower `priority` value first, with
aging so lower classes are not starved; within one priority value, classes share by weight and tenants
within a class share equally, by virtual token counters). The scheduler only calls the methods below. Pure
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


class _Tenant:
    """One tenant's waiting requests within one class of one priority value: a heap of
    (0 if prepended else 1, arrival time, insertion order, request), so the preempted keep their place."""

    __slots__ = ("heap",)

    def __init__(self) -> None:
        self.heap: list[tuple[int, float, int, request_mod.Request]] = []


class _Level:
    """The waiting requests of one priority value: class -> tenant -> _Tenant."""

    __slots__ = ("classes", "size")

    def __init__(self) -> None:
        self.classes: dict[str, dict[str, _Tenant]] = {}
        self.size = 0

    def oldest_arrival(self) -> float:
        # The heads are each tenant's oldest (bar the prepended): aging follows the level's longest wait.
        return min(t.heap[0][1] for tenants in self.classes.values() for t in tenants.values())


class PriorityQueue(RequestQueue):
    """Strict priority between priority values (with aging), token-fair sharing within one.

    Between priority values: the next request comes from the value with the best *effective* priority,
    `priority - waited_s / aging_s` (lower runs sooner), where `waited_s` is the longest wait in that value:
    it gains one level for every `aging_s` seconds, so a low class behind a steady stream of high ones is
    admitted after at most about `(its priority - theirs) * aging_s` seconds (`aging_s=None`: strict).

    Within one priority value: the Virtual Token Counter (Sheng et al., "Fairness in Serving Large Language
    Models", OSDI 2024), on two levels. Every class has a counter that grows by `cost / weight` and every
    tenant (API key) within a class a counter that grows by `cost`, `cost = PROMPT_COST * prompt tokens +
    OUTPUT_COST * output tokens` (`charge`). The scheduler charges a request when it is first admitted with
    its prompt and its `max_tokens` (the paper's variant with a length prediction, the bound as prediction),
    and gives back the unused output when it finishes: admission decisions within one step then see the
    requests admitted just before (batch slots freed together are shared by weight, not handed all to the
    class that was behind), and the final charge is exactly the tokens served. The pick is the class with
    the smallest counter, then its tenant with the smallest counter, then that tenant's oldest request. A
    class or tenant that comes back after having nothing waiting is lifted to the smallest counter among
    those waiting (or, with nobody waiting, to the counter of the last one picked), so idle time earns no
    credit to spend in a burst.

    Bound (the paper's Theorem 4.4, applied per level): while two tenants of a class both have requests
    waiting, their counters differ by at most `2 * U`, `U = PROMPT_COST * L_prompt + OUTPUT_COST *
    L_max_tokens` (the largest single charge); over any interval in which both stay backlogged, the
    tokens served to each therefore differ by at most `4 * U` plus what is charged but not yet served (the
    requests running at the interval's ends). Classes likewise, in counters divided by weight.

    Cost of a pick: O(classes + tenants in the picked class) at the priority value; both are bounded (the
    classes come from the config and tenants from the key file plus one fold value). `prepend` puts a
    request ahead of every other of its tenant, class and priority (preempted requests keep their place).
    """

    PROMPT_COST = 1.0  # the paper's w_p
    OUTPUT_COST = 2.0  # the paper's w_q: a decode token costs a step's worth of weights read for one token

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, aging_s: float | None = None) -> None:
        if aging_s is not None and not aging_s > 0:
            raise ValueError(f"aging_s must be None or > 0, got {aging_s!r}")
        self._levels: dict[int, _Level] = {}
        self._counter = itertools.count()
        self._len = 0
        self._clock = clock
        self._aging_s = aging_s
        # Virtual token counters: (priority, class) -> weighted cost, (priority, class, tenant) -> cost.
        self._class_vtc: dict[tuple[int, str], float] = {}
        self._tenant_vtc: dict[tuple[int, str, str], float] = {}
        self._last_class_vtc: dict[int, float] = {}  # counter of the last class picked, per priority
        self._last_tenant_vtc: dict[tuple[int, str], float] = {}  # of the last tenant picked, per class

    def effective_priority(self, req: request_mod.Request, now: float | None = None) -> float:
        if self._aging_s is None:
            return float(req.priority)
        now = self._clock() if now is None else now
        return req.priority - max(0.0, now - req.arrival_time_s) / self._aging_s

    # ----------------------------------------------------------------------------------------------
    # Virtual token counters

    def charge(self, req: request_mod.Request, num_prompt_tokens: int, num_output_tokens: int) -> None:
        """Count tokens served to `req` against its class and tenant (negative: give back an advance)."""
        cost = self.PROMPT_COST * num_prompt_tokens + self.OUTPUT_COST * num_output_tokens
        priority, qos_class = req.priority, req.qos_class
        ckey = (priority, qos_class)
        self._class_vtc[ckey] = self._class_vtc.get(ckey, 0.0) + cost / req.weight
        tkey = (priority, qos_class, req.tenant)
        self._tenant_vtc[tkey] = self._tenant_vtc.get(tkey, 0.0) + cost

    def counters(self) -> tuple[dict[tuple[int, str], float], dict[tuple[int, str, str], float]]:
        """Copies of the class and tenant counters (for tests and statistics)."""
        return dict(self._class_vtc), dict(self._tenant_vtc)

    def _lift(self, level: _Level, req: request_mod.Request) -> None:
        """A class or tenant that had nothing waiting starts from where the waiting ones are (no credit)."""
        priority, qos_class, tenant = req.priority, req.qos_class, req.tenant
        tenants = level.classes.get(qos_class)
        if tenants is None:
            others = [self._class_vtc.get((priority, c), 0.0) for c in level.classes]
            floor = min(others) if others else self._last_class_vtc.get(priority)
            ckey = (priority, qos_class)
            if floor is not None and self._class_vtc.get(ckey, 0.0) < floor:
                self._class_vtc[ckey] = floor
            self._lift_tenant(priority, qos_class, tenant, ())
        elif tenant not in tenants:
            self._lift_tenant(priority, qos_class, tenant, tenants)

    def _lift_tenant(self, priority: int, qos_class: str, tenant: str, waiting: Iterable[str]) -> None:
        others = [self._tenant_vtc.get((priority, qos_class, t), 0.0) for t in waiting]
        floor = min(others) if others else self._last_tenant_vtc.get((priority, qos_class))
        tkey = (priority, qos_class, tenant)
        if floor is not None and self._tenant_vtc.get(tkey, 0.0) < floor:
            self._tenant_vtc[tkey] = floor

    # ----------------------------------------------------------------------------------------------
    # The queue

    def _push(self, req: request_mod.Request, rank: int) -> None:
        level = self._levels.get(req.priority)
        if level is None:
            level = self._levels[req.priority] = _Level()
        self._lift(level, req)
        tenants = level.classes.setdefault(req.qos_class, {})
        tenant = tenants.get(req.tenant)
        if tenant is None:
            tenant = tenants[req.tenant] = _Tenant()
        heapq.heappush(tenant.heap, (rank, req.arrival_time_s, next(self._counter), req))
        level.size += 1
        self._len += 1

    def add(self, req: request_mod.Request) -> None:
        self._push(req, 1)

    def prepend(self, req: request_mod.Request) -> None:
        self._push(req, 0)

    def _best_priority(self) -> int:
        levels = self._levels
        if len(levels) == 1:
            return next(iter(levels))
        if not levels:
            raise IndexError("peek from an empty queue")
        if self._aging_s is None:
            return min(levels)
        now, aging_s = self._clock(), self._aging_s
        return min(levels, key=lambda p: (p - max(0.0, now - levels[p].oldest_arrival()) / aging_s, p))

    def _pick(self) -> tuple[int, str, str]:
        priority = self._best_priority()
        classes = self._levels[priority].classes
        class_vtc, tenant_vtc = self._class_vtc, self._tenant_vtc
        if len(classes) == 1:
            qos_class = next(iter(classes))
        else:
            qos_class = min(classes, key=lambda c: (class_vtc.get((priority, c), 0.0), c))
        tenants = classes[qos_class]
        if len(tenants) == 1:
            tenant = next(iter(tenants))
        else:
            # Ties (fresh tenants) go to the oldest head, so equal counters mean arrival order.
            tenant = min(tenants, key=lambda t: (tenant_vtc.get((priority, qos_class, t), 0.0), tenants[t].heap[0][:3]))
        return priority, qos_class, tenant

    def peek(self) -> request_mod.Request:
        priority, qos_class, tenant = self._pick()
        return self._levels[priority].classes[qos_class][tenant].heap[0][3]

    def pop(self) -> request_mod.Request:
        priority, qos_class, tenant = self._pick()
        level = self._levels[priority]
        tenants = level.classes[qos_class]
        heap = tenants[tenant].heap
        req = heapq.heappop(heap)[3]
        self._last_class_vtc[priority] = self._class_vtc.get((priority, qos_class), 0.0)
        self._last_tenant_vtc[(priority, qos_class)] = self._tenant_vtc.get((priority, qos_class, tenant), 0.0)
        if not heap:
            del tenants[tenant]
            if not tenants:
                del level.classes[qos_class]
        level.size -= 1
        if not level.size:
            del self._levels[priority]
        self._len -= 1
        return req

    def remove_many(self, req_ids: set[str]) -> list[request_mod.Request]:
        # Aborts are rare next to steps; an O(n) rebuild keeps the heaps simple and exact.
        removed: list[request_mod.Request] = []
        for priority, level in list(self._levels.items()):
            for qos_class, tenants in list(level.classes.items()):
                for name, tenant in list(tenants.items()):
                    gone = [entry[3] for entry in tenant.heap if entry[3].req_id in req_ids]
                    if not gone:
                        continue
                    removed.extend(gone)
                    level.size -= len(gone)
                    kept = [entry for entry in tenant.heap if entry[3].req_id not in req_ids]
                    if kept:
                        heapq.heapify(kept)
                        tenant.heap = kept
                    else:
                        del tenants[name]
                if not tenants:
                    del level.classes[qos_class]
            if not level.size:
                del self._levels[priority]
        self._len -= len(removed)
        return removed

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[request_mod.Request]:
        return (
            entry[3]
            for level in self._levels.values()
            for tenants in level.classes.values()
            for tenant in tenants.values()
            for entry in tenant.heap
        )


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
