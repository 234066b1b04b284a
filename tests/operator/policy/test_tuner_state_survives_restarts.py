"""TunerState round-trips through JSON, so the tuner continues after an operator restart as if none happened."""

from __future__ import annotations

import json

import pytest

from fleetlm_dev.policy_inputs import MakeSpec, MakeWindow
from fleetlm_operator.policy import decide, startup, state
from fleetlm_operator.policy import spec as spec_mod

FULL = state.TunerState(
    recommendations=(state.Recommendation(100.0, 4, 120.5), state.Recommendation(115.0, 4, None)),
    history_start_s=10.0,
    max_batch_size=72,
    max_batch_tokens=3072,
    batch_changed_s=90.0,
    batch_direction=-1,
    shed_classes=("bulk", "batch"),
    shed_changed_s=80.0,
    unshed_clear_since_s=100.0,
    last_replicas=4,
    last_scale_s=50.0,
    updated_s=115.0,
    cost=state.CostSums(
        weight=42.5,
        mean_batch=31.25,
        mean_tpot_s=0.0032,
        ss_batch=812.0,
        sp_batch_tpot=0.071,
        ss_tpot=6.3e-6,
        updated_s=115.0,
    ),
    startup=startup.StartupStats(mean_s=61.5, count=3, last_s=58.0, pods=("svc-a", "svc-b", "svc-c")),
)


@pytest.mark.parametrize("tuner", [state.TunerState(), FULL], ids=["empty", "full"])
def test_round_trip_is_exact(tuner: state.TunerState) -> None:
    text = tuner.to_json()
    assert json.loads(text) == tuner.to_dict()  # plain JSON: fits an annotation or a status field
    assert state.TunerState.from_json(text) == tuner


def test_older_state_without_new_keys_loads_with_defaults() -> None:
    old = {"version": 1, "recommendations": [[100.0, 3]], "maxBatchSize": 48}
    loaded = state.TunerState.from_dict(old)
    assert loaded.recommendations == (state.Recommendation(100.0, 3, None),)
    assert loaded.max_batch_size == 48
    assert loaded.shed_classes == ()
    assert loaded.cost == state.CostSums()  # no fitted cost curve yet: the spec's prior stands
    assert loaded.startup == startup.StartupStats()  # no start-up learnt yet: the prior stands


@pytest.mark.parametrize(
    "bad",
    ['{"version": 99}', '{"recommendations": [["x", 1]]}', "[1, 2]", '{"costCurve": [1, 2]}'],
    ids=["newer-version", "malformed-row", "not-an-object", "malformed-cost-curve"],
)
def test_unreadable_state_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        state.TunerState.from_json(bad)


def _replay(
    spec: spec_mod.PolicySpec, make_window: MakeWindow, *, restart_at: float | None, lose_state: bool
) -> list[int]:
    tuner = state.TunerState()
    current = 8
    seen = []
    for tick in range(0, 40):
        now = tick * spec.interval_s
        if restart_at is not None and now == restart_at:
            tuner = state.TunerState() if lose_state else state.TunerState.from_json(tuner.to_json())
        observed = make_window(pods=current, running_per_pod=60.0 / current, end_s=now)
        decision = decide.decide(spec_mod.PolicyInput(spec, current, current), observed, tuner, now=now)
        tuner, current = decision.state, decision.replicas
        seen.append(current)
    return seen


def test_a_restart_with_persisted_state_changes_nothing(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    spec = make_spec()
    assert _replay(spec, make_window, restart_at=150.0, lose_state=False) == _replay(
        spec, make_window, restart_at=None, lose_state=False
    )


def test_a_restart_that_lost_state_waits_a_full_window_before_scaling_down(
    make_spec: MakeSpec, make_window: MakeWindow
) -> None:
    spec = make_spec()
    lost = _replay(spec, make_window, restart_at=150.0, lose_state=True)
    first_down = next(i for i, n in enumerate(lost) if n < 8)
    assert first_down * spec.interval_s >= 150.0 + spec.scale_down_stabilization_s
