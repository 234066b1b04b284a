"""Missing, partial or stale data never scales down (and never reads as zero load); zero traffic on complete
data does scale down (the NaN-at-idle failure mode of Dynamo #6985, AIBrix #593, KubeAI #382)."""

from __future__ import annotations

from typing import Any

import pytest

from fleetlm_dev.policy_inputs import MakeSpec, MakeWindow
from fleetlm_operator.policy import decide, state, window
from fleetlm_operator.policy import spec as spec_mod


def settled_state(spec: spec_mod.PolicySpec, make_window: MakeWindow, *, replicas: int) -> state.TunerState:
    """A state whose last stabilization window was all light, clean load (so a scale-down is due)."""
    tuner = state.TunerState()
    for tick in range(0, 21):
        now = tick * spec.interval_s
        observed = make_window(pods=replicas, running_per_pod=5.0, end_s=now)
        tuner = decide.decide(spec_mod.PolicyInput(spec, replicas, replicas), observed, tuner, now=now).state
    return tuner


@pytest.mark.parametrize(
    ("window_kwargs", "ready", "reason_part"),
    [
        ({"complete": False, "reason": "3/4 pods scraped (missing: p3)", "expected": 4, "pods": 3}, 4, "incomplete"),
        ({"complete": False, "reason": "stale scrape of p1 (95s old > 30s)"}, 4, "incomplete"),
        ({"complete": False, "reason": "no baseline scrape for p2"}, 4, "incomplete"),
        ({}, 3, "starting"),
        ({"waiting_per_pod": 6.0}, 4, "waiting/pod"),
        ({"ttft_attainment": 0.97, "ttft_quantile_s": 0.45}, 4, "no latency headroom"),
    ],
    ids=["pod-missing", "stale", "no-baseline", "pod-starting", "queue", "no-headroom"],
)
def test_a_due_scale_down_is_held(
    make_spec: MakeSpec, make_window: MakeWindow, window_kwargs: dict[str, Any], ready: int, reason_part: str
) -> None:
    spec = make_spec()
    tuner = settled_state(spec, make_window, replicas=4)
    now = 21 * spec.interval_s
    # Control: with clean data this very tick would step down.
    clean = decide.decide(
        spec_mod.PolicyInput(spec, 4, 4), make_window(pods=4, running_per_pod=5.0, end_s=now), tuner, now=now
    )
    assert clean.replicas == 3
    kwargs = {"pods": 4, "running_per_pod": 5.0, "end_s": now, **window_kwargs}
    decision = decide.decide(spec_mod.PolicyInput(spec, 4, ready), make_window(**kwargs), tuner, now=now)
    assert decision.replicas == 4
    assert any(reason_part in r for r in decision.reasons), decision.reasons


def test_no_metrics_at_all_holds_and_says_so(make_spec: MakeSpec) -> None:
    spec = make_spec()
    empty = window.unavailable(
        "0/4 pods scraped (missing: p0, p1, p2, p3)", now_s=500.0, quantile=0.95, num_pods_expected=4
    )
    decision = decide.decide(spec_mod.PolicyInput(spec, 4, 4), empty, state.TunerState(), now=500.0)
    assert decision.replicas == 4
    assert decision.metrics_available is False
    assert "0/4 pods scraped" in decision.metrics_reason
    assert any("never scale down on missing data" in r for r in decision.reasons)
    assert decision.max_batch_size == spec.batching.max_batch_size  # nothing grows on no data either


def test_zero_traffic_on_complete_data_scales_down(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    spec = make_spec(min_replicas=1)
    tuner = state.TunerState()
    current = 3
    for tick in range(0, 40):
        now = tick * spec.interval_s
        idle = make_window(
            pods=current,
            running_per_pod=0.0,
            arrival_per_s=0.0,
            service_s=None,
            num_requests=0,
            ttft_quantile_s=None,
            tpot_quantile_s=None,
            ttft_mean_s=None,
            tpot_mean_s=None,
            ttft_attainment=None,
            tpot_attainment=None,
            end_s=now,
        )
        decision = decide.decide(spec_mod.PolicyInput(spec, current, current), idle, tuner, now=now)
        tuner, current = decision.state, decision.replicas
    assert current == 1
