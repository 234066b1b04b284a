"""A prefix's home is the replica its first request went to (the least loaded then), so the second request
hits the blocks the first one computed, a burst of new prefixes spreads by load rather than by hash, and
unique prompts stay balanced within 1.25x of the mean in flight."""

from __future__ import annotations

import collections
import random
import statistics

from fleetlm_router import picker

REPLICAS = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]


def _key(i: int) -> bytes:
    return picker.prefix_key({"prompt": [i, *range(300)]}) or b""


def _route(ring: picker.HashRing, seen: picker.SeenKeys, key: bytes, in_flight: dict[str, int]) -> picker.Pick:
    """What the router does per request (app.RouterState.pick): seen?, home, pick, note."""
    was_seen = seen.check_and_add(key)
    choice = picker.pick_affinity(ring, key=key, in_flight=in_flight, seen=was_seen, home=seen.home(key))
    assert choice is not None
    seen.note_pick(key, choice, ring.replicas)
    return choice


def test_the_second_request_follows_the_first_not_the_ring_point() -> None:
    ring = picker.HashRing(REPLICAS)
    seen = picker.SeenKeys()
    for i in range(20):
        key = _key(i)
        ring_point = next(ring.walk(key))
        # Its ring point is the busiest: the first request goes to the least loaded replica.
        others = [r for r in REPLICAS if r != ring_point]
        loads = {ring_point: 3, others[0]: 1, others[1]: 2}
        first = _route(ring, seen, key, loads)
        assert first == picker.Pick(others[0], picker.REASON_NEW_PREFIX)
        second = _route(ring, seen, key, {r: 1 for r in REPLICAS})
        assert second == picker.Pick(others[0], picker.REASON_AFFINITY)


def test_a_burst_of_new_prefixes_spreads_evenly_and_each_keeps_one_home() -> None:
    ring = picker.HashRing(REPLICAS)
    seen = picker.SeenKeys()
    in_flight: dict[str, int] = collections.Counter()
    homes: dict[bytes, set[str]] = collections.defaultdict(set)
    for i in range(8):  # 8 new prefixes arrive together (nothing finishes meanwhile)
        choice = _route(ring, seen, _key(i), in_flight)
        in_flight[choice.replica] += 1
        homes[_key(i)].add(choice.replica)
    assert sorted(in_flight.values()) == [2, 3, 3]
    in_flight.clear()
    for _ in range(5):  # then each comes back, one at a time, on an idle fleet: always home
        for i in range(8):
            homes[_key(i)].add(_route(ring, seen, _key(i), in_flight).replica)
    assert all(len(replicas) == 1 for replicas in homes.values())


def test_over_the_bound_a_prefix_spills_and_its_home_stays() -> None:
    ring = picker.HashRing(REPLICAS)
    seen = picker.SeenKeys()
    key = _key(5)
    home = _route(ring, seen, key, {}).replica
    loads = {r: 0 for r in REPLICAS}
    loads[home] = 6  # bound at 2x: ceil(2 * 7 / 3) = 5
    spilled = _route(ring, seen, key, loads)
    assert spilled.reason == picker.REASON_SPILL and spilled.replica != home
    assert seen.home(key) == home
    assert _route(ring, seen, key, {}) == picker.Pick(home, picker.REASON_AFFINITY)


def test_a_home_that_left_is_replaced_by_the_ring_and_then_kept() -> None:
    seen = picker.SeenKeys()
    key = _key(9)
    home = _route(picker.HashRing(REPLICAS), seen, key, {}).replica
    rest = picker.HashRing([r for r in REPLICAS if r != home])
    new_home = _route(rest, seen, key, {})
    assert new_home.replica != home and seen.home(key) == new_home.replica
    assert new_home.replica == next(rest.walk(key))  # routers that never saw the key agree on it
    # The old replica comes back: the key stays where its blocks now are.
    assert _route(picker.HashRing(REPLICAS), seen, key, {}).replica == new_home.replica


def test_homes_are_forgotten_with_their_keys() -> None:
    seen = picker.SeenKeys(capacity=2)
    for i in range(3):
        seen.check_and_add(_key(i))
        seen.note_pick(_key(i), picker.Pick(REPLICAS[i], picker.REASON_NEW_PREFIX), REPLICAS)
    assert seen.home(_key(0)) is None  # pushed out by the third key
    assert [seen.home(_key(i)) for i in (1, 2)] == REPLICAS[1:]


def test_unique_prompts_keep_the_busiest_replica_within_1_25x_of_the_mean() -> None:
    """A closed loop of 12 streams of unique prompts whose service time grows with the replica's load (a
    shared batch): the time-averaged in-flight of the busiest replica stays within 1.25x of the mean."""
    rng = random.Random(1)
    ring = picker.HashRing(REPLICAS)
    seen = picker.SeenKeys()
    in_flight = dict.fromkeys(REPLICAS, 0)
    running: list[tuple[float, str]] = []
    samples: dict[str, list[int]] = collections.defaultdict(list)
    now = 0.0
    for i in range(2000):
        if len(running) >= 12:
            running.sort()
            now, done = running.pop(0)
            in_flight[done] -= 1
        choice = _route(ring, seen, _key(10_000 + i), in_flight)
        in_flight[choice.replica] += 1
        running.append((now + (1 + 0.3 * in_flight[choice.replica]) * rng.uniform(0.2, 2.0), choice.replica))
        for name in REPLICAS:
            samples[name].append(in_flight[name])
    means = [statistics.fmean(v) for v in samples.values()]
    assert max(means) / statistics.fmean(means) <= 1.25


def test_on_an_idle_fleet_new_prefixes_go_to_their_ring_point_whatever_the_rotation() -> None:
    ring = picker.HashRing(REPLICAS)
    for i in range(30):
        for tie_break in (0, 1, 2):
            choice = picker.pick_affinity(ring, key=_key(i), in_flight={}, seen=False, tie_break=tie_break)
            assert choice == picker.Pick(next(ring.walk(_key(i))), picker.REASON_NEW_PREFIX)
