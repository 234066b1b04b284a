"""Missing, stale or partial data makes a window incomplete with a reason, stays None, and is never zero.
A restarted pod counts from zero (like Prometheus' increase()); a pod born inside the window counts whole."""

from __future__ import annotations

import dataclasses

import pytest

from fleetlm_operator.policy import histogram, window
from fleetlm_operator.policy import spec as spec_mod

SPEC = spec_mod.PolicySpec(slo=spec_mod.SLOTargets(ttft_s=0.5, tpot_s=0.05), max_replicas=8)
BOUNDS = (0.1, 0.5, 1.0)


def sample(
    name: str,
    at_s: float,
    *,
    ttft: tuple[float, float, float, float] = (0, 0, 0, 0),
    finished: float = 0.0,
    started_at_s: float | None = 0.0,
    running: float = 2.0,
    waiting: float = 1.0,
    **changes: object,
) -> window.PodSample:
    *cumulative, count = ttft
    base = window.PodSample(
        pod=name,
        scraped_at_s=at_s,
        running_by_class={"default": running},
        waiting_by_class={"default": waiting},
        kv_usage=0.2,
        gpu_utilization=None,
        ttft_by_class={"default": histogram.Histogram(BOUNDS, tuple(cumulative), count, 0.0)},
        tpot_by_class={"default": histogram.Histogram.empty((0.025, 0.05))},
        finished_by_class={"default": finished},
        started_at_s=started_at_s,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def observe(
    previous: dict[str, window.PodSample], current: dict[str, window.PodSample], expected: list[str]
) -> window.ObservedWindow:
    return window.from_scrapes(previous, current, expected_pods=expected, spec=SPEC, now_s=115.0, max_age_s=30.0)


def test_all_pods_fresh_and_with_baselines_is_complete() -> None:
    previous = {p: sample(p, 100.0) for p in ("a", "b")}
    current = {p: sample(p, 115.0, ttft=(5, 9, 10, 10), finished=10) for p in ("a", "b")}
    observed = observe(previous, current, ["a", "b"])
    assert observed.complete
    assert observed.reason == ""
    assert observed.num_pods_sampled == observed.num_pods_expected == 2
    assert observed.num_waiting == 2.0
    assert observed.gpu_utilization is None  # CPU pods: absent, and that alone is not incomplete


@pytest.mark.parametrize(
    ("current", "expected", "reason_part"),
    [
        ({"a": sample("a", 115.0)}, ["a", "b"], "1/2 pods scraped (missing: b)"),
        ({"a": sample("a", 115.0), "b": sample("b", 60.0)}, ["a", "b"], "stale scrape of b"),
        ({"a": sample("a", 115.0), "b": sample("b", 115.0, missing=frozenset({"ttft"}))}, ["a", "b"], "b lacks ttft"),
        ({"a": sample("a", 115.0), "c": sample("c", 115.0, started_at_s=10.0)}, ["a", "c"], "no baseline scrape for c"),
    ],
    ids=["pod-not-scraped", "stale-scrape", "family-missing", "no-baseline"],
)
def test_partial_data_makes_the_window_incomplete(
    current: dict[str, window.PodSample], expected: list[str], reason_part: str
) -> None:
    previous = {p: sample(p, 100.0) for p in ("a", "b")}
    observed = observe(previous, current, expected)
    assert not observed.complete
    assert reason_part in observed.reason
    assert observed.num_pods_expected == len(expected)


def test_no_pods_scraped_leaves_every_figure_unknown_not_zero() -> None:
    observed = observe({}, {}, ["a", "b"])
    assert not observed.complete
    assert "0/2 pods scraped" in observed.reason
    assert observed.num_waiting is None
    assert observed.num_running is None
    assert observed.arrival_per_s is None
    assert observed.kv_usage is None
    assert observed.ttft_quantile_s is None


def test_absent_kv_gauge_stays_none() -> None:
    previous = {"a": sample("a", 100.0)}
    current = {"a": sample("a", 115.0, kv_usage=None, missing=frozenset({"kv_usage"}))}
    observed = observe(previous, current, ["a"])
    assert observed.kv_usage is None
    assert not observed.complete


@pytest.mark.parametrize(
    "restarted",
    [
        sample("a", 115.0, ttft=(3, 4, 4, 4), finished=4, started_at_s=0.0),  # counters went backwards
        sample("a", 115.0, ttft=(30, 60, 70, 70), finished=70, started_at_s=108.0),  # new process, already past
    ],
    ids=["counters-decreased", "process-start-moved"],
)
def test_a_restarted_pod_counts_from_zero(restarted: window.PodSample) -> None:
    previous = {"a": sample("a", 100.0, ttft=(10, 40, 50, 50), finished=50)}
    observed = observe(previous, {"a": restarted}, ["a"])
    assert observed.num_counter_resets == 1
    assert observed.complete, observed.reason
    count = restarted.ttft_by_class["default"].count
    assert observed.num_requests == count  # everything since the restart, nothing subtracted
    assert observed.finished_per_s == pytest.approx(restarted.finished_by_class["default"] / 15.0)


def test_a_pod_born_inside_the_window_counts_whole() -> None:
    previous = {"a": sample("a", 100.0)}
    current = {"a": sample("a", 115.0), "n": sample("n", 115.0, ttft=(8, 10, 10, 10), finished=10, started_at_s=105.0)}
    observed = observe(previous, current, ["a", "n"])
    assert observed.complete, observed.reason
    assert observed.num_requests == 10
    assert observed.finished_per_s == pytest.approx(10 / 10.0)  # over the 10 s the new pod existed


def test_a_pod_that_loaded_for_long_counts_from_its_ready_time() -> None:
    # Process started 60 s ago (before the window), ready 5 s into it: its first scrape counts from ready,
    # where it served nothing before; the process start alone would leave it without a baseline.
    previous = {"a": sample("a", 100.0)}
    fresh = sample("n", 115.0, ttft=(8, 10, 10, 10), finished=10, started_at_s=55.0, ready_at_s=105.0)
    observed = observe(previous, {"a": sample("a", 115.0), "n": fresh}, ["a", "n"])
    assert observed.complete, observed.reason
    assert observed.num_pods_with_delta == 2
    assert observed.finished_per_s == pytest.approx(10 / 10.0)
    unknown = dataclasses.replace(fresh, ready_at_s=None)
    partial = observe(previous, {"a": sample("a", 115.0), "n": unknown}, ["a", "n"])
    assert not partial.complete and "no baseline scrape for n" in partial.reason
