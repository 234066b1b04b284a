"""The baseline: desired = ceil(current * waiting_per_pod / 5), 10% tolerance, 300 s scale-down stabilization."""

from __future__ import annotations

import pytest

from fleetlm_dev.policy_inputs import build_spec as make_spec
from fleetlm_dev.policy_inputs import build_window as make_window
from fleetlm_dev.sim import hpa
from fleetlm_operator.policy import spec as spec_mod
from fleetlm_operator.policy import state, window


@pytest.mark.parametrize(
    ("current", "waiting_per_pod", "expected"),
    [
        (4, 10.0, 8),  # twice the target: double
        (4, 5.4, 4),  # within 10% tolerance: hold
        (4, 4.6, 4),
        (4, 30.0, 8),  # six times: capped at max(2x, +4) per step
        (2, 30.0, 6),  # the +4 pods cap wins for small fleets
        (10, 40.0, 16),  # and the spec's max
    ],
)
def test_scale_up_follows_the_queue(current: int, waiting_per_pod: float, expected: int) -> None:
    spec = make_spec()
    decision = hpa.decide(
        spec_mod.PolicyInput(spec, current, current),
        make_window(pods=current, waiting_per_pod=waiting_per_pod),
        state.TunerState(),
        now=100.0,
    )
    assert decision.replicas == expected
    assert decision.max_batch_size == spec.batching.max_batch_size  # the baseline never tunes batches
    assert decision.shed_classes == ()


def test_scale_down_takes_the_highest_recommendation_of_the_last_300s() -> None:
    spec = make_spec()
    tuner = state.TunerState()
    current = 8
    seen = []
    for tick in range(0, 30):
        now = tick * 15.0
        decision = hpa.decide(
            spec_mod.PolicyInput(spec, current, current), make_window(pods=current, waiting_per_pod=0.0), tuner, now=now
        )
        tuner, current = decision.state, decision.replicas
        seen.append(current)
    # An empty queue recommends the minimum at once; the HPA seeds its history with the count it found,
    # holds that for 300 s, then drops straight to min in one go (no one-step limit).
    assert seen[:20] == [8] * 20
    assert seen[20:] == [1] * 10


def test_missing_queue_metric_holds() -> None:
    spec = make_spec()
    empty = window.unavailable("0/4 pods scraped", now_s=100.0, quantile=0.95, num_pods_expected=4)
    decision = hpa.decide(spec_mod.PolicyInput(spec, 4, 4), empty, state.TunerState(), now=100.0)
    assert decision.replicas == 4
