"""The queue bound sized in time (`policy.queuebound`): each class's per-replica queue limit is about its TTFT
target times what a full replica completes per second, so a surge past what runs is refused (429) instead of
queued where it misses its target and keeps the next interval's arrivals waiting behind it.

Behind a plain Service after a 1x -> 4x step the 3 old pods' queues of 32 held the first interval the new pods
served to 80% of the SLO (GPU profile; 86% on cpu-tiny): recovery 3 intervals, the #18 bar is 2.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from fleetlm_dev.policy_inputs import MakeSpec, MakeWindow
from fleetlm_operator.policy import decide, queuebound, state
from fleetlm_operator.policy import spec as spec_mod


def _rate(service_s: float, batch: float, full: int, half: float) -> float:
    """What a full batch completes per second, service time carried along the cost line 1 + b/h."""
    return full / (service_s * (1.0 + full / half) / (1.0 + batch / half))


def test_a_full_replicas_completions_per_second_come_from_the_service_time_along_the_cost_line(
    make_spec: MakeSpec, make_window: MakeWindow
) -> None:
    spec = make_spec()
    observed = make_window(pods=4, running_per_pod=30.0, service_s=4.0)
    rate = queuebound.full_batch_rate(observed, max_batch_size=64, tuning=spec.tuning)
    assert rate is not None
    assert math.isclose(rate, _rate(4.0, 30.0, 64, spec.tuning.batch_half_cost_seqs))  # 11.1/s, not 30/4 = 7.5/s


def test_the_decision_bounds_each_classs_queue_at_one_ttft_target_of_that_work(
    make_spec: MakeSpec, make_window: MakeWindow
) -> None:
    spec = make_spec()
    observed = make_window(pods=4, running_per_pod=30.0, service_s=4.0)
    decision = decide.decide(
        spec_mod.PolicyInput(spec, current_replicas=4, ready_replicas=4), observed, state.TunerState(), now=1000.0
    )
    rate = _rate(4.0, 30.0, decision.max_batch_size, spec.tuning.batch_half_cost_seqs)
    assert decision.queue_limits == {"default": round(0.5 * rate)}
    assert decision.state.queue_limits == decision.queue_limits  # in force from now: the next tick holds it
    assert any(r.startswith("queue bound: default - ->") for r in decision.reasons)


def test_the_bound_never_exceeds_the_classs_own_queue_limit_nor_falls_below_the_minimum(
    make_spec: MakeSpec, make_window: MakeWindow
) -> None:
    observed = make_window(pods=4, running_per_pod=30.0, service_s=4.0)
    capped = make_spec(classes=(spec_mod.ClassSpec("default", queue_limit=4),))
    assert queuebound.decide_queue_bound(capped, observed, max_batch_size=64, held={}).limits == {"default": 4}
    # A slow engine (20 s per request at a batch of 2) completes under one a second at a full batch of 8: the
    # floor still lets a few wait rather than refusing every request that finds the batch full.
    slow = make_window(pods=16, running_per_pod=2.0, service_s=20.0)  # 24 finishes in the window: enough
    spec = make_spec()
    bound = queuebound.decide_queue_bound(spec, slow, max_batch_size=8, held={})
    assert bound.limits == {"default": spec.tuning.queue_bound_min}


def test_the_bound_in_force_is_held_within_the_band_and_moves_beyond_it(
    make_spec: MakeSpec, make_window: MakeWindow
) -> None:
    spec = make_spec()
    observed = make_window(pods=4, running_per_pod=30.0, service_s=4.0)  # wants 6
    held = queuebound.decide_queue_bound(spec, observed, max_batch_size=64, held={"default": 5})
    assert held.limits == {"default": 5}
    assert held.reasons == ()  # nothing moved: no new runtime config to push
    moved = queuebound.decide_queue_bound(spec, observed, max_batch_size=64, held={"default": 3})
    assert moved.limits == {"default": 6}
    assert moved.reasons and "default 3 -> 6" in moved.reasons[0]


@pytest.mark.parametrize("service_s", [None, 4.0])
def test_without_a_service_time_or_enough_finishes_the_bound_in_force_stays(
    make_spec: MakeSpec, make_window: MakeWindow, service_s: float | None
) -> None:
    spec = make_spec()
    observed = make_window(pods=4, running_per_pod=30.0, service_s=service_s, arrival_per_s=1.0)
    if service_s is not None:
        observed = dataclasses.replace(observed, finished_per_s=0.5)  # 7 finishes in 15 s
    bound = queuebound.decide_queue_bound(spec, observed, max_batch_size=64, held={"default": 9})
    assert bound.limits == {"default": 9}
    assert queuebound.decide_queue_bound(spec, observed, max_batch_size=64, held={}).limits == {}


def test_classes_without_a_ttft_target_keep_the_specs_queue_limit(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    spec = make_spec(
        slo=spec_mod.SLOTargets(ttft_s=None, tpot_s=0.05, percentile=95.0),
        classes=(
            spec_mod.ClassSpec("interactive", ttft_s=0.25, sheddable=True),
            spec_mod.ClassSpec("batch", sheddable=True),
        ),
    )
    observed = make_window(pods=4, running_per_pod=30.0, service_s=4.0)
    bound = queuebound.decide_queue_bound(spec, observed, max_batch_size=64, held={})
    rate = _rate(4.0, 30.0, 64, spec.tuning.batch_half_cost_seqs)
    assert bound.limits == {"interactive": round(0.25 * rate)}


def test_with_several_classes_only_the_sheddable_ones_are_bounded(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    """Critical and standard requests queue (the Inference Extension drops only Sheddable ones under saturation):
    the demo's standard class must be served, late if need be; a lone class has nobody else to protect."""
    classes = (
        spec_mod.ClassSpec("critical", priority=0),
        spec_mod.ClassSpec("standard", priority=1),
        spec_mod.ClassSpec("sheddable", priority=2, sheddable=True),
    )
    spec = make_spec(classes=classes)
    observed = make_window(pods=4, running_per_pod=30.0, service_s=4.0)
    bound = queuebound.decide_queue_bound(spec, observed, max_batch_size=64, held={})
    rate = _rate(4.0, 30.0, 64, spec.tuning.batch_half_cost_seqs)
    assert bound.limits == {"sheddable": round(spec.slo.ttft_s * rate)}  # type: ignore[operator]
    lone = make_spec(classes=(spec_mod.ClassSpec("standard", priority=1),))
    assert set(queuebound.decide_queue_bound(lone, observed, max_batch_size=64, held={}).limits) == {"standard"}


def test_the_bound_survives_an_operator_restart_and_advice_applies_none(
    make_spec: MakeSpec, make_window: MakeWindow
) -> None:
    stored = state.TunerState(queue_limits={"default": 5})
    assert state.TunerState.from_json(stored.to_json()).queue_limits == {"default": 5}
    assert state.TunerState.from_dict({"version": 1}).queue_limits == {}  # a state from an older operator
    spec = dataclasses.replace(make_spec(), advise=True)
    observed = make_window(pods=4, running_per_pod=30.0, service_s=4.0)
    decision = decide.decide(
        spec_mod.PolicyInput(spec, current_replicas=4, ready_replicas=4), observed, state.TunerState(), now=1000.0
    )
    assert decision.queue_limits  # recorded as advice ...
    assert decision.state.queue_limits == {}  # ... and what is in force is what was before
