"""The replicas' own load, as their /metrics report it (vLLM names), next to the router's in-flight count:
the exposition is read right, stale reports are ignored, others' traffic counts, and a queueing or
KV-full replica loses its prefixes to the next one on the ring (pure: no process, no clock)."""

from __future__ import annotations

from fleetlm_router import picker, scrape
from fleetlm_runtime import metrics as runtime_metrics

REPLICAS = ["a", "b", "c"]


def _report(waiting: float = 0, running: float = 0, kv: float | None = 0.0, *, at: float = 100.0, own: int = 0):
    return picker.Scraped(waiting, running, kv, at, own)


def _loads(
    own: dict[str, int], scraped: dict[str, picker.Scraped], *, now: float = 100.5, queue: int = 1
) -> picker.Loads:
    return picker.replica_loads(
        own, scraped, replicas=REPLICAS, now_s=now, max_age_s=3.0, kv_saturated=0.95, queue_saturated=queue
    )


def test_parse_load_reads_the_runtimes_own_exposition() -> None:
    m = runtime_metrics.RuntimeMetrics(model_name="tiny", max_model_len=64, qos_classes=["default", "batch"])
    text = m.render()
    reported = scrape.parse_load(text)
    assert reported == scrape.Reported(0.0, 0.0, 0.0)


def test_parse_load_sums_series_and_ignores_lookalikes() -> None:
    text = b"""# HELP vllm:num_requests_waiting Queued.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m",engine="0"} 3.0
vllm:num_requests_waiting{model_name="m",engine="1"} 2
vllm:num_requests_waiting_by_reason{reason="x"} 100
vllm:num_requests_running{model_name="m",weird="a}b"} 4.0 1700000000000
vllm:kv_cache_usage_perc{model_name="m"} 0.5
vllm:kv_cache_usage_perc{model_name="m",engine="1"} 0.75
fleetlm_num_requests_waiting{qos_class="x"} 99
vllm:num_requests_running{model_name="m"} NaN
"""
    assert scrape.parse_load(text) == scrape.Reported(5.0, 4.0, 0.75)
    assert scrape.parse_load(b"fleetlm_num_requests_waiting 3\n") is None  # not a replica the picker can read
    assert scrape.parse_load(b"vllm:num_requests_waiting{\nvllm:num_requests_running oops\n") is None


def test_load_is_own_in_flight_plus_the_others_at_the_last_scrape() -> None:
    # a: 5 requests there at the scrape, 2 of them ours then; 3 of ours now -> 3 + (5 - 2) = 6.
    scraped = {"a": _report(waiting=1, running=4, own=2), "b": _report(running=1, own=1)}
    loads = _loads({"a": 3, "b": 0, "c": 1}, scraped)
    assert loads.load == {"a": 6, "b": 0, "c": 1}
    assert loads.saturated == frozenset({"a"})  # it queues


def test_stale_or_future_reports_are_ignored() -> None:
    scraped = {"a": _report(waiting=9, running=9, at=90.0), "b": _report(waiting=9, at=200.0)}
    loads = _loads({"a": 1}, scraped)
    assert loads.load == {"a": 1, "b": 0, "c": 0}
    assert loads.saturated == frozenset()


def test_a_short_queue_under_the_threshold_does_not_saturate() -> None:
    scraped = {"a": _report(waiting=7, running=16), "b": _report(waiting=8, running=16)}
    assert _loads({}, scraped, queue=8).saturated == frozenset({"b"})


def test_a_full_kv_cache_saturates() -> None:
    loads = _loads({}, {"c": _report(running=2, kv=0.97)})
    assert loads.saturated == frozenset({"c"}) and loads.load["c"] == 2


def test_traffic_the_router_did_not_send_moves_new_work_away() -> None:
    ring = picker.HashRing(REPLICAS)
    # Another router filled `a` and `b`; this one has nothing open anywhere.
    loads = _loads({}, {"a": _report(running=6), "b": _report(running=3)})
    choice = picker.pick_affinity(ring, key=None, in_flight=loads.load, saturated=loads.saturated)
    assert choice == picker.Pick("c", picker.REASON_LEAST_LOADED)


def test_a_queueing_home_spills_a_seen_prefix_to_the_next_on_the_ring() -> None:
    ring = picker.HashRing(REPLICAS)
    key = picker.prefix_key({"prompt": list(range(300))})
    order = list(ring.walk(key))  # type: ignore[arg-type]
    home, second = order[0], order[1]
    calm = _loads({}, {home: _report(running=1)})
    assert picker.pick_affinity(ring, key=key, in_flight=calm.load, saturated=calm.saturated) == picker.Pick(
        home, picker.REASON_AFFINITY
    )
    queueing = _loads({}, {home: _report(waiting=2, running=1)})
    assert picker.pick_affinity(ring, key=key, in_flight=queueing.load, saturated=queueing.saturated) == picker.Pick(
        second, picker.REASON_SPILL
    )
    # Unseen keys and key-less requests avoid it too, even where it is the least loaded.
    for seen, k in ((False, key), (True, None)):
        choice = picker.pick_affinity(
            ring, key=k, in_flight={home: 0, second: 1, order[2]: 1}, saturated=frozenset({home}), seen=seen
        )
        assert choice is not None and choice.replica != home


def test_when_every_replica_queues_the_bound_decides() -> None:
    ring = picker.HashRing(REPLICAS)
    key = picker.prefix_key({"prompt": list(range(300))})
    home = next(ring.walk(key))  # type: ignore[arg-type]
    choice = picker.pick_affinity(ring, key=key, in_flight={}, saturated=frozenset(REPLICAS))
    assert choice == picker.Pick(home, picker.REASON_AFFINITY)


def test_the_bound_still_holds_with_saturated_replicas() -> None:
    """30 requests of one hot prefix while one replica queues: none above the bound, the queueing one
    gets none while the others have room, and it keeps its turn in the least-loaded order otherwise."""
    ring = picker.HashRing(REPLICAS)
    key = picker.prefix_key({"prompt": list(range(300))})
    home = next(ring.walk(key))  # type: ignore[arg-type]
    in_flight: dict[str, int] = {}
    for _ in range(30):
        choice = picker.pick_affinity(ring, key=key, in_flight=in_flight, load_factor=1.25, saturated=frozenset({home}))
        assert choice is not None and choice.replica != home
        in_flight[choice.replica] = in_flight.get(choice.replica, 0) + 1
    assert sorted(in_flight.values()) == [15, 15]
