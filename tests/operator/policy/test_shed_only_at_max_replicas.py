"""Shedding: only at max replicas with the demand past max and the SLO missed; least urgent sheddable class
first, one per cooldown; never a class the spec does not mark sheddable."""

from __future__ import annotations

import dataclasses

import pytest

from fleetlm_dev.policy_inputs import THREE_CLASSES as CLASSES
from fleetlm_dev.policy_inputs import MakeSpec, MakeWindow
from fleetlm_operator.policy import decide, state, window
from fleetlm_operator.policy import spec as spec_mod

NOW = 5000.0


def per_class(
    *,
    attainment: float,
    rejected_per_s: float = 0.0,
    running: float = 60.0,
    waiting: float = 12.0,
    shed: tuple[str, ...] = (),
) -> dict[str, window.ClassWindow]:
    out = {}
    for c in CLASSES:
        refused = c.name in shed
        out[c.name] = window.ClassWindow(
            name=c.name,
            num_requests=0 if refused else 300,
            ttft_quantile_s=None if refused else 1.5,
            tpot_quantile_s=None if refused else 0.03,
            ttft_attainment=None if refused else attainment,
            tpot_attainment=None if refused else 1.0,
            finished_per_s=0.0 if refused else 20.0,
            rejected_per_s=rejected_per_s if refused else 0.0,
            num_running=0.0 if refused else running,
            num_waiting=0.0 if refused else waiting,
        )
    return out


def overloaded(make_window: MakeWindow, *, pods: int, shed: tuple[str, ...] = ()) -> window.ObservedWindow:
    return make_window(
        pods=pods,
        running_per_pod=64.0,
        waiting_per_pod=20.0,
        arrival_per_s=40.0 * pods,
        service_s=4.0,
        ttft_attainment=0.6,
        ttft_quantile_s=1.5,
        end_s=NOW,
        classes=per_class(attainment=0.6, shed=shed),
    )


@dataclasses.dataclass(frozen=True)
class Case:
    current: int
    shed_before: tuple[str, ...]
    changed_ago_s: float | None
    expected: tuple[str, ...]


CASES = {
    # At max, overloaded, missing: the least urgent sheddable class goes.
    "first-shed": Case(4, (), None, ("bulk",)),
    # Still missing after the cooldown: the next one.
    "second-shed": Case(4, ("bulk",), 60.0, ("bulk", "batch")),
    # Within the cooldown: wait for the first shed to show.
    "cooldown": Case(4, ("bulk",), 15.0, ("bulk",)),
    # Only sheddable classes; interactive is never shed.
    "never-non-sheddable": Case(4, ("bulk", "batch"), 60.0, ("bulk", "batch")),
    # Below max: scale up instead (even to max: the new pods are not ready yet).
    "below-max": Case(2, (), None, ()),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_shedding_rule(make_spec: MakeSpec, make_window: MakeWindow, case: Case) -> None:
    spec = make_spec(max_replicas=4, classes=CLASSES)
    tuner = state.TunerState(
        shed_classes=case.shed_before, shed_changed_s=None if case.changed_ago_s is None else NOW - case.changed_ago_s
    )
    observed = overloaded(make_window, pods=case.current, shed=case.shed_before)
    decision = decide.decide(spec_mod.PolicyInput(spec, case.current, case.current), observed, tuner, now=NOW)
    assert decision.shed_classes == case.expected
    if case.current < spec.max_replicas:
        assert decision.replicas > case.current
    assert "interactive" not in decision.shed_classes


def test_at_max_but_meeting_the_slo_sheds_nothing(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    spec = make_spec(max_replicas=4, classes=CLASSES)
    busy_but_fine = make_window(
        pods=4, running_per_pod=64.0, waiting_per_pod=1.0, end_s=NOW, classes=per_class(attainment=0.99)
    )
    decision = decide.decide(spec_mod.PolicyInput(spec, 4, 4), busy_but_fine, state.TunerState(), now=NOW)
    assert decision.shed_classes == ()
