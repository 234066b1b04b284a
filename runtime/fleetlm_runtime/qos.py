"""QoS rules at the door: which class a client may ask for, and whether a new request is admitted.

Two pure decisions, table-tested, with no clock, no I/O and no HTTP (the server feeds them the time and
the load it sees):

- `may_choose(ceiling, requested)`: a client that names its class (header or body field, where the config
  allows it) may only move *down*: never to a lower priority value, never from sheddable to protected,
  never to a larger weight at the same priority. The ceiling is its API key's class (the default class
  for requests without a known key). So nobody raises their own class by adding a header.
- `admit(...)`: admit, or refuse with 429 and why. In order: a class no longer in the table (removed
  live while the request was being read); the operator's `qos.shedClasses`; the global
  queue bound (`batching.maxQueueLen`: a full queue displaces the newest waiting request of a lower class
  rather than refuse a higher one); the class's `queueLimit`; then, for sheddable classes only, SLO
  pressure: the whole queue at `shedding.queueFraction` of its bound, or a protected class (not sheddable,
  with a TTFT target) whose oldest waiting request has waited, or whose recent TTFT p90 has reached,
  `shedding.ttftFraction` of its target. Sheddable traffic is thus turned away while the classes above it
  still meet their targets, not after. With `qos.policy: fifo` only the global bound applies (the plain
  batcher, kept as a baseline). A refusal that sheds a class also evicts that class's waiting requests
  (`Verdict.evict`): the server answers them 429 too, since their responses begin only with a first token.

`RecentTTFT` keeps the bounded per-class samples the pressure rule reads. Imports only `config` and
`contract`; it must never import the engine, aiohttp or prometheus-client.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Mapping

from fleetlm_runtime import config as config_mod
from fleetlm_runtime import contract

TTFT_QUANTILE = 0.9  # the "recent TTFT" of a class: this quantile of its samples in the window
MAX_TTFT_SAMPLES = 512  # per class; a window at high rate keeps the newest


# ------------------------------------------------------------------------------------------------
# Class choice


def may_choose(ceiling: config_mod.QoSClass, requested: config_mod.QoSClass) -> bool:
    """Whether a client entitled to `ceiling` may run in `requested`: only if it is nowhere better."""
    if requested.name == ceiling.name:
        return True
    if requested.priority < ceiling.priority:
        return False  # runs sooner
    if ceiling.sheddable and not requested.sheddable:
        return False  # would be protected from shedding
    # Weights share capacity among classes of equal priority: a larger one is a bigger share.
    return not (requested.priority == ceiling.priority and requested.weight > ceiling.weight)


# ------------------------------------------------------------------------------------------------
# Admission


@dataclasses.dataclass(frozen=True, slots=True)
class ClassLoad:
    """What the server sees of one class right now."""

    num_waiting: int = 0  # admitted, not yet given a batch slot
    oldest_wait_s: float = 0.0  # how long the oldest of those has waited (0 when none waits)
    recent_ttft_s: float | None = None  # TTFT p90 over the recent window; None: no sample in it


@dataclasses.dataclass(frozen=True, slots=True)
class Eviction:
    """Requests of `qos_class` still waiting for a batch slot to refuse now, with a 429 of `code`: the newest
    `count` of them, or all (None). Their response has not begun (it begins with the first token), so each
    client gets the same 429 and Retry-After a refusal at the door gives, not a stream cut short."""

    qos_class: str
    count: int | None
    code: str
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    admit: bool
    code: str | None = None  # contract.CODE_*: queue_full, class_shed, slo_shed
    message: str = ""
    evict: Eviction | None = None  # waiting requests to refuse with this decision (admitted or not)

    @classmethod
    def ok(cls) -> Verdict:
        return cls(admit=True)


def admit(
    qos_class: str,
    *,
    qos: config_mod.QoSSettings,
    max_queue_len: int,
    load: Mapping[str, ClassLoad],
) -> Verdict:
    """Admit a new request of `qos_class` given the load, or say why not (every refusal is a 429)."""
    classes = qos.by_name()
    cls = classes.get(qos_class)
    if cls is None:
        # Its class was removed (PUT /admin/config) after the request was given it and before admission;
        # a retry is given a class from the table in force.
        return Verdict(False, contract.CODE_CLASS_SHED, f"class {qos_class!r} is no longer one of the classes")
    total_waiting = sum(item.num_waiting for item in load.values())
    mine = load.get(qos_class, ClassLoad())
    fifo = qos.policy == contract.QOS_POLICY_FIFO

    if not fifo and qos_class in qos.shed_classes:
        return _refuse_and_evict(qos_class, mine, contract.CODE_CLASS_SHED, shed_message(qos_class))
    if total_waiting >= max_queue_len:
        return _full_queue(cls, qos=qos, max_queue_len=max_queue_len, load=load)
    if fifo:
        return Verdict.ok()
    if cls.queue_limit is not None and mine.num_waiting >= cls.queue_limit:
        return Verdict(
            False, contract.CODE_QUEUE_FULL, f"the queue for class {qos_class!r} is full ({cls.queue_limit} waiting)"
        )
    return _shed_early(cls, mine, qos=qos, max_queue_len=max_queue_len, total_waiting=total_waiting, load=load)


def shed_message(qos_class: str) -> str:
    """Why a request of a class the operator sheds (`qos.shedClasses`) is refused."""
    return f"class {qos_class!r} is being shed: the service is at capacity"


def _refuse_and_evict(qos_class: str, mine: ClassLoad, code: str, message: str) -> Verdict:
    """Refuse a request of a class being shed, and the ones of that class still waiting: they would be
    served only after every class above them (aged, long after the client gave up), and meanwhile hold a
    place in the queue."""
    evict = Eviction(qos_class, None, code, message) if mine.num_waiting else None
    return Verdict(False, code, message, evict=evict)


def _full_queue(
    cls: config_mod.QoSClass, *, qos: config_mod.QoSSettings, max_queue_len: int, load: Mapping[str, ClassLoad]
) -> Verdict:
    """At the queue's bound: room is made for a higher class, the newest waiting request of the lowest class
    below it refused instead, so a backlog of standard requests never turns critical ones away. Otherwise
    (nothing lower waits, or `fifo`) the new request is refused."""
    full = f"the queue is full ({max_queue_len} waiting)"
    lowest = None if qos.policy == contract.QOS_POLICY_FIFO else _displaceable(cls, qos=qos, load=load)
    if lowest is None:
        return Verdict(False, contract.CODE_QUEUE_FULL, full)
    message = f"{full}; displaced by a request of class {cls.name!r}"
    return Verdict(True, evict=Eviction(lowest, 1, contract.CODE_QUEUE_FULL, message))


def _displaceable(
    arriving: config_mod.QoSClass, *, qos: config_mod.QoSSettings, load: Mapping[str, ClassLoad]
) -> str | None:
    """The class whose newest waiting request a full queue refuses to admit one of `arriving`: the lowest
    priority (largest value) strictly below it with a request waiting, sheddable before protected at equal
    priority; None when no class below it waits."""
    below = [c for c in qos.classes if c.priority > arriving.priority and load.get(c.name, ClassLoad()).num_waiting > 0]
    if not below:
        return None
    return max(below, key=lambda c: (c.priority, c.sheddable)).name


def _shed_early(
    cls: config_mod.QoSClass,
    mine: ClassLoad,
    *,
    qos: config_mod.QoSSettings,
    max_queue_len: int,
    total_waiting: int,
    load: Mapping[str, ClassLoad],
) -> Verdict:
    """SLO-driven shedding: a sheddable class is refused before the queue is full, once the queue passes
    its fraction or a protected class's delay nears its TTFT target."""
    qos_class = cls.name
    if not cls.sheddable or not qos.shedding.enabled:
        return Verdict.ok()
    shedding = qos.shedding
    if total_waiting >= shedding.queue_fraction * max_queue_len:
        return _refuse_and_evict(
            qos_class,
            mine,
            contract.CODE_SLO_SHED,
            f"class {qos_class!r} is shed: {total_waiting} requests wait "
            f"(>= {shedding.queue_fraction:.0%} of the queue)",
        )
    for other in qos.classes:
        target = other.ttft_target_s
        if other.sheddable or target is None:
            continue
        seen = load.get(other.name, ClassLoad())
        delay = max(seen.oldest_wait_s, seen.recent_ttft_s or 0.0)
        if delay >= shedding.ttft_fraction * target:
            return _refuse_and_evict(
                qos_class,
                mine,
                contract.CODE_SLO_SHED,
                f"class {qos_class!r} is shed to keep class {other.name!r} within its TTFT target "
                f"({delay * 1000:.0f} ms of {target * 1000:.0f} ms)",
            )
    return Verdict.ok()


# ------------------------------------------------------------------------------------------------
# Recent TTFT per class


class RecentTTFT:
    """TTFT samples per class over a sliding window, bounded in count; the caller passes the time."""

    def __init__(self, *, max_samples: int = MAX_TTFT_SAMPLES) -> None:
        self._max_samples = max_samples
        self._samples: dict[str, collections.deque[tuple[float, float]]] = {}

    def observe(self, qos_class: str, *, now_s: float, ttft_s: float) -> None:
        samples = self._samples.get(qos_class)
        if samples is None:
            samples = self._samples[qos_class] = collections.deque(maxlen=self._max_samples)
        samples.append((now_s, ttft_s))

    def quantile(self, qos_class: str, *, now_s: float, window_s: float, q: float = TTFT_QUANTILE) -> float | None:
        """The q-quantile (nearest rank) of the samples newer than `window_s`; None when there are none."""
        samples = self._samples.get(qos_class)
        if not samples:
            return None
        cutoff = now_s - window_s
        while samples and samples[0][0] < cutoff:
            samples.popleft()
        if not samples:
            return None
        values = sorted(ttft for _, ttft in samples)
        rank = max(1, math.ceil(q * len(values)))
        return values[rank - 1]
