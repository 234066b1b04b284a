"""The pure picker: a prefix keeps its replica, no replica exceeds the load bound, and a change of the
replica set moves only the keys it must."""

from __future__ import annotations

import collections
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetlm_router import picker

REPLICAS = ["a", "b", "c"]


def _key(i: int) -> bytes:
    return picker.prefix_key({"prompt": [i, *range(300)]}) or b""


def test_same_prefix_same_replica_when_idle() -> None:
    ring = picker.HashRing(REPLICAS)
    key = picker.prefix_key({"prompt": "You are a helpful assistant. " * 40 + "question one"})
    other = picker.prefix_key({"prompt": "You are a helpful assistant. " * 40 + "another question"})
    assert key == other  # the leading tokens are the same; the question lies past them
    first = picker.pick_affinity(ring, key=key, in_flight={})
    assert first is not None and first.reason == picker.REASON_AFFINITY
    for _ in range(5):
        assert picker.pick_affinity(ring, key=key, in_flight={}) == first


def test_keys_spread_over_replicas() -> None:
    ring = picker.HashRing(REPLICAS)
    homes = collections.Counter(picker.pick_affinity(ring, key=_key(i), in_flight={}).replica for i in range(600))  # type: ignore[union-attr]
    assert set(homes) == set(REPLICAS)
    assert min(homes.values()) > 600 / 3 * 0.6  # 100 virtual nodes each: roughly even


def test_a_hot_prefix_spills_at_the_bound_and_never_exceeds_it() -> None:
    ring = picker.HashRing(REPLICAS)
    key = _key(7)
    in_flight: dict[str, int] = {}
    reasons = collections.Counter()
    for _ in range(30):  # 30 concurrent requests of one prefix
        choice = picker.pick_affinity(ring, key=key, in_flight=in_flight, load_factor=1.25)
        assert choice is not None
        in_flight[choice.replica] = in_flight.get(choice.replica, 0) + 1
        reasons[choice.reason] += 1
        total = sum(in_flight.values())
        assert max(in_flight.values()) <= math.ceil(1.25 * total / 3)
    assert reasons[picker.REASON_AFFINITY] >= 10 and reasons[picker.REASON_SPILL] > 0
    home = picker.pick_affinity(ring, key=key, in_flight={}).replica  # type: ignore[union-attr]
    assert in_flight[home] == max(in_flight.values())  # the home replica still takes the largest share


def test_removing_a_replica_moves_only_its_keys() -> None:
    before = picker.HashRing(REPLICAS)
    after = picker.HashRing(["a", "b"])
    moved = 0
    for i in range(300):
        old = picker.pick_affinity(before, key=_key(i), in_flight={}).replica  # type: ignore[union-attr]
        new = picker.pick_affinity(after, key=_key(i), in_flight={}).replica  # type: ignore[union-attr]
        if old != "c":
            assert new == old
        else:
            moved += 1
    assert 0 < moved < 200


def test_no_key_goes_to_the_least_loaded_and_ties_rotate() -> None:
    ring = picker.HashRing(REPLICAS)
    choice = picker.pick_affinity(ring, key=None, in_flight={"a": 3, "b": 1, "c": 2})
    assert choice == picker.Pick("b", picker.REASON_LEAST_LOADED)
    tied = {picker.pick_affinity(ring, key=None, in_flight={}, tie_break=i).replica for i in range(3)}  # type: ignore[union-attr]
    assert tied == set(REPLICAS)


def test_excluded_replicas_are_skipped_and_none_left_is_none() -> None:
    ring = picker.HashRing(REPLICAS)
    key = _key(1)
    home = picker.pick_affinity(ring, key=key, in_flight={}).replica  # type: ignore[union-attr]
    second = picker.pick_affinity(ring, key=key, in_flight={}, exclude=frozenset({home}))
    assert second is not None and second.replica != home
    assert picker.pick_affinity(ring, key=key, in_flight={}, exclude=frozenset(REPLICAS)) is None
    assert picker.pick_affinity(picker.HashRing([]), key=key, in_flight={}) is None


def test_an_unseen_prefix_goes_to_the_least_loaded_and_a_seen_one_goes_home() -> None:
    ring = picker.HashRing(REPLICAS)
    key = _key(3)
    home = picker.pick_affinity(ring, key=key, in_flight={}).replica  # type: ignore[union-attr]
    others = [r for r in REPLICAS if r != home]
    loads = {home: 1, others[0]: 2, others[1]: 0}
    assert picker.pick_affinity(ring, key=key, in_flight=loads, seen=False) == picker.Pick(
        others[1], picker.REASON_NEW_PREFIX
    )
    assert picker.pick_affinity(ring, key=key, in_flight=loads, seen=True) == picker.Pick(home, picker.REASON_AFFINITY)


def test_seen_keys_remember_the_most_recent_ones() -> None:
    seen = picker.SeenKeys(capacity=2)
    # c pushes b out (a was used after b); a stays; b then counts as new again.
    assert [seen.check_and_add(k) for k in (b"a", b"b", b"a", b"c", b"a", b"b")] == [
        False, False, True, False, True, False,
    ]  # fmt: skip


def test_round_robin_cycles_in_name_order() -> None:
    rr = picker.RoundRobin()
    assert [rr.pick(["c", "a", "b"]).replica for _ in range(4)] == ["a", "b", "c", "a"]  # type: ignore[union-attr]


def test_prefix_key_reads_completions_chat_and_token_ids() -> None:
    assert picker.prefix_key({"prompt": [1, 2, 3]}, num_tokens=2) == picker.prefix_key(
        {"prompt": [1, 2, 9]}, num_tokens=2
    )
    assert picker.prefix_key({"prompt": [1, 2, 3]}, num_tokens=3) != picker.prefix_key(
        {"prompt": [1, 2, 9]}, num_tokens=3
    )
    chat = {"messages": [{"role": "system", "content": "sys " * 300}, {"role": "user", "content": "hi"}]}
    assert picker.prefix_key(chat) == picker.prefix_key(
        {**chat, "messages": [*chat["messages"][:1], {"role": "user", "content": "yo"}]}
    )
    assert picker.prefix_key({"prompt": ["one"]}) == picker.prefix_key({"prompt": "one"})
    for empty in ({}, {"prompt": ""}, {"prompt": []}, {"prompt": [True]}, {"prompt": 3}, {"messages": "x"}):
        assert picker.prefix_key(empty) is None


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(st.characters(codec=None)),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.dictionaries(st.sampled_from(["prompt", "messages", "model", "x"]), _json, max_size=3))
def test_prefix_key_never_raises_on_any_json(body: dict) -> None:
    key = picker.prefix_key(body)
    assert key is None or isinstance(key, bytes)
