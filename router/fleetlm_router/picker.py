"""Which replica serves a request: prefix affinity by consistent hashing with bounded load.

Pure: no clock, no I/O, no aiohttp. The proxy hands it the ready replicas, the in-flight count it keeps
per replica, what the replicas last reported about their own load (with the time, read by the caller)
and the request's prefix key; it returns a replica and the reason, as data.

- `prefix_key(body, num_tokens)`: the prompt's leading tokens (token-id prompts: the first `num_tokens`
  ids; text: the first `num_tokens * CHARS_PER_TOKEN` characters, since the router has no tokenizer; chat:
  the messages rendered in order). Requests that share a system prompt or a document share a key, so
  they land where that prefix already sits in the KV cache.
- `HashRing`: each replica owns `vnodes` points on a 64-bit ring, so adding or removing one replica moves
  only about 1/n of the keys (the rest keep their warm caches).
- `pick_affinity(...)`: consistent hashing with bounded load (Mirrokni, Thorup and Zadimoghaddam 2018, as
  KubeAI routes): walk the ring from the key and take the first replica whose in-flight count is under
  `ceil(load_factor * (total + 1) / n)`. A hot prefix therefore spills to the next replica on the ring
  (which then warms up too) instead of piling onto one, and no replica exceeds the mean by more than
  `load_factor`. A request without a key (too short to share anything) goes to the least loaded replica,
  and so does a key the router has not seen recently (`SeenKeys`): a prompt nobody shares gains nothing
  from a home, so unique traffic is balanced as evenly as least-loaded balances it, while a prefix seen
  again goes home. With few hot prefixes a tight bound spills most of them (8 prefixes on 3 replicas at
  1.25x: 28% of picks spill and each prefix ends up on 2.2 replicas, a simulation of `pick_affinity`
  shows), hence the default of 2x for repeated prefixes.
- A key's *home* is the replica its first request went to (`SeenKeys` remembers it, as llm-d's prefix
  scorer remembers where it sent a prefix), not its point on the ring: that replica computed the prefix,
  so the second request hits it (the ring point would compute it a second time elsewhere), and since the
  first request went to the least loaded replica, a burst of new prefixes is spread by load instead of by
  hash (a ring puts 4 or 5 of 8 prefixes on one of 3 replicas about half the time, and the bound then
  has to spill them). The ring still orders the spills after the home, and picks the new home of a key
  whose home left the replica set.
- `replica_loads(...)`: the load each replica is judged by. The router's own in-flight count is exact
  and current but blind to traffic that reached a replica another way (a second router replica, clients
  of the runtime Service); a replica's /metrics (`vllm:num_requests_waiting`/`running`,
  `vllm:kv_cache_usage_perc`, as an Inference Gateway endpoint picker reads them) sees everything but is a
  scrape old. So load = own in flight now + the others' requests at the last scrape (what the replica
  reported minus what this router had open there then). A replica whose queue reaches `queue_saturated`
  or whose KV cache is nearly full is *saturated*: a seen prefix spills past it as if it were at its
  bound, and least-loaded picks prefer the others. The threshold is a queue, not any queue: a short one
  is what batching looks like under load, and the bound already weighs it (queued requests are in the
  load); spilling a prefix for it would trade a cache hit for a few milliseconds of queueing.
  Scrapes older than `max_age_s` are ignored: a stale number is worse than none.
- `RoundRobin`: the blind baseline a Kubernetes Service gives, kept for benchmarks.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

CHARS_PER_TOKEN = 4  # text prompts: about four characters per token on common BPEs
DEFAULT_PREFIX_TOKENS = 256
DEFAULT_LOAD_FACTOR = 2.0
DEFAULT_VNODES = 100

REASON_AFFINITY = "affinity"  # the key's home replica on the ring
REASON_SPILL = "spill"  # the home replica was at its bound; a later one on the ring
REASON_LEAST_LOADED = "least_loaded"  # no key, or no ring
REASON_NEW_PREFIX = "new_prefix"  # a key not seen recently: least loaded
REASON_ROUND_ROBIN = "round_robin"
REASONS = (REASON_AFFINITY, REASON_SPILL, REASON_LEAST_LOADED, REASON_NEW_PREFIX, REASON_ROUND_ROBIN)
DEFAULT_SEEN_KEYS = 4096


@dataclasses.dataclass(frozen=True, slots=True)
class Pick:
    replica: str
    reason: str


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def prefix_key(body: Mapping[str, Any], *, num_tokens: int = DEFAULT_PREFIX_TOKENS) -> bytes | None:
    """The bytes the ring hashes for this request, or None when it carries no usable prompt.

    Never raises on odd input: a body the runtime will refuse still gets routed (and refused there).
    """
    if num_tokens <= 0:
        return None
    prompt = body.get("prompt")
    if prompt is None and isinstance(body.get("messages"), list):
        parts = []
        for message in body["messages"]:
            if isinstance(message, Mapping):
                content = message.get("content")
                text = content if isinstance(content, str) else json.dumps(content, sort_keys=True, default=str)
                parts.append(f"{message.get('role')}:{text}\n")
        prompt = "".join(parts)
    if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        text = prompt[: num_tokens * CHARS_PER_TOKEN]
        return ("t:" + text).encode("utf-8", "surrogatepass") if text else None
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return ("i:" + ",".join(str(t) for t in prompt[:num_tokens])).encode()
    return None


class HashRing:
    """Replica names on a 64-bit ring, `vnodes` points each; rebuilt when the set changes."""

    def __init__(self, replicas: Sequence[str], *, vnodes: int = DEFAULT_VNODES) -> None:
        points = sorted((_hash64(f"{name}#{i}".encode()), name) for name in set(replicas) for i in range(vnodes))
        self._hashes = [h for h, _ in points]
        self._names = [n for _, n in points]
        self.replicas = frozenset(replicas)

    def walk(self, key: bytes) -> Iterator[str]:
        """Distinct replicas in ring order, starting at the key's position."""
        if not self._names:
            return
        start = bisect.bisect(self._hashes, _hash64(key))
        seen: set[str] = set()
        for i in range(len(self._names)):
            name = self._names[(start + i) % len(self._names)]
            if name not in seen:
                seen.add(name)
                yield name
                if len(seen) == len(self.replicas):
                    return


def load_bound(total_in_flight: int, num_replicas: int, load_factor: float) -> int:
    """The most requests a replica may hold once this one is placed (at least 1)."""
    return max(1, math.ceil(load_factor * (total_in_flight + 1) / max(1, num_replicas)))


@dataclasses.dataclass(frozen=True, slots=True)
class Scraped:
    """What a replica reported on /metrics, when (the caller's monotonic clock), and the router's own
    in-flight count on it at that moment (its part of what the replica reported)."""

    waiting: float
    running: float
    kv_usage: float | None
    at_s: float
    own_at_scrape: int


@dataclasses.dataclass(frozen=True, slots=True)
class Loads:
    """Per replica: the load the picker balances, and which replicas are saturated."""

    load: dict[str, int]
    saturated: frozenset[str]


def replica_loads(
    own: Mapping[str, int],
    scraped: Mapping[str, Scraped],
    *,
    replicas: Iterable[str],
    now_s: float,
    max_age_s: float,
    kv_saturated: float,
    queue_saturated: int = 1,
) -> Loads:
    """Own in flight plus the others' requests from a fresh scrape; saturated = `queue_saturated` or more
    requests queued, or KV nearly full."""
    load: dict[str, int] = {}
    saturated: set[str] = set()
    for name in replicas:
        mine = own.get(name, 0)
        report = scraped.get(name)
        if report is None or now_s - report.at_s > max_age_s or now_s < report.at_s:
            load[name] = mine
            continue
        others = max(0, math.ceil(report.waiting + report.running) - report.own_at_scrape)
        load[name] = mine + others
        if report.waiting >= queue_saturated or (report.kv_usage is not None and report.kv_usage >= kv_saturated):
            saturated.add(name)
    return Loads(load, frozenset(saturated))


def least_loaded(
    candidates: Sequence[str],
    in_flight: Mapping[str, int],
    *,
    tie_break: int = 0,
    saturated: frozenset[str] = frozenset(),
) -> str:
    """Fewest in flight among the unsaturated (all, if every one is); ties rotate with `tie_break`."""
    candidates = [c for c in candidates if c not in saturated] or list(candidates)
    low = min(in_flight.get(c, 0) for c in candidates)
    tied = sorted(c for c in candidates if in_flight.get(c, 0) == low)
    return tied[tie_break % len(tied)]


def pick_affinity(
    ring: HashRing,
    *,
    key: bytes | None,
    in_flight: Mapping[str, int],
    load_factor: float = DEFAULT_LOAD_FACTOR,
    exclude: frozenset[str] = frozenset(),
    tie_break: int = 0,
    seen: bool = True,
    saturated: frozenset[str] = frozenset(),
    home: str | None = None,
) -> Pick | None:
    """The replica for a request with prefix `key`; None when every replica is excluded.

    `in_flight`: each replica's load (`replica_loads`, or the router's own counts alone).
    `seen`: whether the key came recently (see `SeenKeys`); an unseen key goes to the least loaded replica.
    `saturated`: replicas a seen key passes over as if at their bound, unless every candidate is one.
    `home`: where the key's first request went (`SeenKeys.home`); tried before the ring, if still listed.
    """
    candidates = [r for r in ring.replicas if r not in exclude]
    if not candidates:
        return None
    saturated = saturated & frozenset(candidates)
    if saturated == frozenset(candidates):
        saturated = frozenset()  # all queueing: only the load bound can tell them apart
    if key is None:
        return Pick(least_loaded(candidates, in_flight, tie_break=tie_break, saturated=saturated), REASON_LEAST_LOADED)
    if not seen:
        # Ties go by the ring, not by rotation: on an idle fleet a burst of new prefixes then spreads by hash
        # (a rotation counter shared with every other pick can send them all to one replica).
        pool = [c for c in candidates if c not in saturated] or candidates
        low = min(in_flight.get(c, 0) for c in pool)
        tied = {c for c in pool if in_flight.get(c, 0) == low}
        return Pick(next(name for name in ring.walk(key) if name in tied), REASON_NEW_PREFIX)
    total = sum(in_flight.get(r, 0) for r in candidates)
    bound = load_bound(total, len(candidates), load_factor)
    first = True
    order = ring.walk(key)
    if home is not None and home in ring.replicas:
        order = _home_first(home, order)
    for name in order:
        if name in exclude:
            continue
        if name not in saturated and in_flight.get(name, 0) + 1 <= bound:
            return Pick(name, REASON_AFFINITY if first else REASON_SPILL)
        first = False
    # Every unsaturated replica is at its bound (the bound counts the saturated ones' load too, or the
    # factor is below 1): the least loaded of them, still a spill from the key's home.
    return Pick(least_loaded(candidates, in_flight, tie_break=tie_break, saturated=saturated), REASON_SPILL)


def _home_first(home: str, walk: Iterator[str]) -> Iterator[str]:
    yield home
    yield from (name for name in walk if name != home)


class SeenKeys:
    """The most recent `capacity` prefix keys (by hash), least recently seen out first, each with its home:
    the replica its first request went to (None until one is noted). No clock, no I/O."""

    def __init__(self, capacity: int = DEFAULT_SEEN_KEYS) -> None:
        self._capacity = capacity
        self._keys: collections.OrderedDict[int, str | None] = collections.OrderedDict()

    def check_and_add(self, key: bytes) -> bool:
        """Whether `key` was seen recently; records it either way."""
        h = _hash64(key)
        seen = h in self._keys
        if seen:
            self._keys.move_to_end(h)
        else:
            self._keys[h] = None
            while len(self._keys) > self._capacity:
                self._keys.popitem(last=False)
        return seen

    def home(self, key: bytes) -> str | None:
        return self._keys.get(_hash64(key))

    def note_pick(self, key: bytes, pick: Pick, replicas: Iterable[str]) -> None:
        """After `pick` served a request with `key`: the first replica a key lands on becomes its home, and
        so does the next one when its home has left the replica set. A spill leaves the home as it is."""
        h = _hash64(key)
        if h not in self._keys:
            return  # pushed out meanwhile by newer keys
        current = self._keys[h]
        if current is None or current not in replicas:
            self._keys[h] = pick.replica


class RoundRobin:
    """The next replica in name order, skipping excluded ones (what a Service's kube-proxy roughly does)."""

    def __init__(self) -> None:
        self._next = 0

    def pick(self, replicas: Sequence[str], *, exclude: frozenset[str] = frozenset()) -> Pick | None:
        candidates = sorted(r for r in replicas if r not in exclude)
        if not candidates:
            return None
        name = candidates[self._next % len(candidates)]
        self._next += 1
        return Pick(name, REASON_ROUND_ROBIN)
