"""Percentiles and attainment come from bucket *deltas* between two scrapes, interpolated like Prometheus."""

from __future__ import annotations

import math

import pytest

from fleetlm_operator.policy import histogram, window
from fleetlm_operator.policy import spec as spec_mod

BOUNDS = (0.1, 0.25, 0.5, 1.0)
SPEC = spec_mod.PolicySpec(slo=spec_mod.SLOTargets(ttft_s=0.5, tpot_s=0.05, percentile=95.0), max_replicas=4)


def hist(cumulative: tuple[float, ...], count: float, total: float = 0.0) -> histogram.Histogram:
    return histogram.Histogram(bounds=BOUNDS, cumulative=cumulative, count=count, sum=total)


def pod(name: str, at_s: float, ttft: histogram.Histogram, *, finished: float = 0.0) -> window.PodSample:
    return window.PodSample(
        pod=name,
        scraped_at_s=at_s,
        running_by_class={"default": 0.0},
        waiting_by_class={"default": 0.0},
        kv_usage=0.1,
        ttft_by_class={"default": ttft},
        tpot_by_class={"default": histogram.Histogram.empty((0.025, 0.05, 0.1))},
        finished_by_class={"default": finished},
        started_at_s=0.0,
    )


# Hand-computed: deltas (10, 30, 60, 70) of 70 observations.
# p95: rank 66.5 lies in (0.5, 1.0] between 60 and 70 -> 0.5 + 0.5 * 6.5/10 = 0.825
# p50: rank 35 lies in (0.25, 0.5] between 30 and 60 -> 0.25 + 0.25 * 5/30
@pytest.mark.parametrize(
    ("q", "expected"),
    [(0.95, 0.825), (0.5, 0.25 + 0.25 * 5 / 30), (0.1, 0.1 * 7 / 10)],
)
def test_quantile_of_the_delta_matches_the_hand_computed_value(q: float, expected: float) -> None:
    before = hist((10, 20, 30, 30), 30)
    after = hist((20, 50, 90, 100), 100)
    delta = after.minus(before)
    assert delta is not None
    assert delta.cumulative == (10, 30, 60, 70)
    assert histogram.histogram_quantile(q, delta) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("limit", "expected"),
    [(0.5, 60 / 70), (0.3, (30 + 0.2 * 30) / 70), (0.05, 0.5 * 10 / 70), (1.0, 1.0), (2.0, 1.0), (0.0, 0.0)],
)
def test_fraction_under_target_interpolates_inside_the_bucket(limit: float, expected: float) -> None:
    delta = hist((10, 30, 60, 70), 70)
    assert histogram.histogram_fraction_at_most(limit, delta) == pytest.approx(expected)


def test_rank_in_the_inf_bucket_answers_the_highest_finite_bound() -> None:
    delta = hist((10, 30, 60, 70), 80)  # ten observations above 1.0
    assert histogram.histogram_quantile(0.95, delta) == 1.0
    # Observations past the highest bound count as misses of any target beyond it.
    assert histogram.histogram_fraction_at_most(5.0, delta) == pytest.approx(70 / 80)


def test_an_empty_histogram_has_no_percentile_rather_than_zero() -> None:
    empty = hist((0, 0, 0, 0), 0)
    assert histogram.histogram_quantile(0.95, empty) is None
    assert histogram.histogram_fraction_at_most(0.5, empty) is None


def test_window_sums_bucket_deltas_over_pods_before_interpolating() -> None:
    previous = {"a": pod("a", 100.0, hist((10, 20, 30, 30), 30)), "b": pod("b", 100.0, hist((0, 0, 0, 0), 0))}
    current = {"a": pod("a", 115.0, hist((20, 50, 90, 100), 100)), "b": pod("b", 115.0, hist((0, 0, 0, 10), 10))}
    observed = window.from_scrapes(previous, current, expected_pods=["a", "b"], spec=SPEC, now_s=115.0, max_age_s=30.0)
    assert observed.complete, observed.reason
    assert observed.num_requests == 80
    # Summed deltas (10, 30, 60, 80): rank 76 lies in (0.5, 1.0] between 60 and 80.
    assert observed.ttft_quantile_s == pytest.approx(0.5 + 0.5 * 16 / 20)
    assert observed.ttft_attainment == pytest.approx(60 / 80)
    assert observed.window_s == pytest.approx(15.0)


def test_rates_come_from_counter_deltas_per_pod() -> None:
    previous = {"a": pod("a", 100.0, hist((0, 0, 0, 0), 0), finished=100.0)}
    current = {"a": pod("a", 110.0, hist((0, 0, 0, 0), 0), finished=150.0)}
    observed = window.from_scrapes(previous, current, expected_pods=["a"], spec=SPEC, now_s=110.0, max_age_s=30.0)
    assert observed.finished_per_s == pytest.approx(5.0)
    assert observed.arrival_per_s == pytest.approx(5.0)  # nothing piled up in between
    assert observed.ttft_quantile_s is None  # no first tokens in the window: unknown, not 0
    assert not math.isnan(observed.finished_per_s)
