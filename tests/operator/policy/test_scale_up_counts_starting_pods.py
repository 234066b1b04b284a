"""Scale-up is fast (several replicas at once when the backlog needs it) and counts pods still starting."""

from __future__ import annotations

import dataclasses

import pytest

from fleetlm_dev.policy_inputs import MakeSpec, MakeWindow
from fleetlm_operator.policy import decide, replicas, state, window
from fleetlm_operator.policy import spec as spec_mod


def overloaded(make_window: MakeWindow) -> window.ObservedWindow:
    # 4 ready pods with full batches (64) and 40 waiting each; arrivals twice what they finish.
    return make_window(
        pods=4,
        running_per_pod=64.0,
        waiting_per_pod=40.0,
        arrival_per_s=128.0,
        service_s=4.0,
        ttft_attainment=0.4,
        ttft_quantile_s=3.0,
    )


def test_a_backlog_asks_for_several_replicas_at_once(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    spec = make_spec()
    observed = overloaded(make_window)
    decision = decide.decide(
        spec_mod.PolicyInput(spec, current_replicas=4, ready_replicas=4), observed, state.TunerState(), now=1000.0
    )
    assert decision.replicas >= 4 + 3
    assert decision.replicas <= spec.max_replicas
    assert any("scale up 4 ->" in r for r in decision.reasons)


@pytest.mark.parametrize(
    ("starting_extra", "expect"),
    [
        (0, "wanted"),  # nothing on its way: go to what the demand asks for
        (-3, "arrivals"),  # some on their way, not enough: top up to the arrival rate (they drain the backlog)
        (2, "hold"),  # more than enough on their way: no new pods
    ],
    ids=["none-starting", "too-few-starting", "enough-starting"],
)
def test_pods_starting_count_toward_the_demand(
    make_spec: MakeSpec, make_window: MakeWindow, starting_extra: int, expect: str
) -> None:
    # Batch limits held still, so the replica rule alone is on trial.
    spec = make_spec(
        tuning=spec_mod.Tuning(max_scale_up_factor=10.0),
        max_replicas=64,
        batching=spec_mod.BatchingBounds(max_batch_size=64, max_batch_tokens=4096, autotune=False),
    )
    observed = overloaded(make_window)
    demand = replicas.estimate_demand(observed, tuning=spec.tuning)
    assert demand is not None
    wanted = replicas.wanted_replicas(demand, max_batch_size=spec.batching.max_batch_size, tuning=spec.tuning)
    assert wanted > 8
    current = wanted + starting_extra if starting_extra else 4
    decision = decide.decide(
        spec_mod.PolicyInput(spec, current_replicas=current, ready_replicas=4), observed, state.TunerState(), now=1000.0
    )
    if expect == "wanted":
        assert decision.replicas == wanted
    elif expect == "arrivals":
        steady = dataclasses.replace(demand, slots=demand.concurrency_slots, backlog_slots=0.0)
        ask = replicas.wanted_replicas(steady, max_batch_size=spec.batching.max_batch_size, tuning=spec.tuning)
        assert current < ask < wanted
        assert decision.replicas == ask
    else:
        assert decision.replicas == current
        assert any("no scale-down" in r and "starting" in r for r in decision.reasons)


def test_a_slo_miss_without_load_does_not_add_replicas(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    # TPOT misses with half-empty batches and no queue: the batch is at fault, not the fleet size.
    spec = make_spec()
    observed = make_window(pods=4, running_per_pod=20.0, tpot_attainment=0.8, tpot_quantile_s=0.07, tpot_mean_s=0.06)
    decision = decide.decide(
        spec_mod.PolicyInput(spec, current_replicas=4, ready_replicas=4), observed, state.TunerState(), now=1000.0
    )
    assert decision.replicas == 4
    # The batch answers: with 20 running of 64 a smaller size would not bind, so the token budget shrinks.
    assert decision.max_batch_tokens < spec.batching.max_batch_tokens
    assert decision.max_batch_size == spec.batching.max_batch_size


def test_scale_up_is_capped_at_max_replicas(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    spec = make_spec(max_replicas=6)
    decision = decide.decide(
        spec_mod.PolicyInput(spec, current_replicas=4, ready_replicas=4),
        overloaded(make_window),
        state.TunerState(),
        now=1000.0,
    )
    assert decision.replicas == 6


@pytest.mark.parametrize(
    ("max_replicas", "tpot_mean_s", "batch_holds"),
    [(64, 0.055, True), (4, 0.055, False), (64, 0.3, False)],
    ids=["pods-relieve-it", "at-max", "too-slow-for-pods"],
)
def test_a_tpot_miss_on_an_overloaded_fleet_adds_pods_and_keeps_the_batch(
    make_spec: MakeSpec, make_window: MakeWindow, max_replicas: int, tpot_mean_s: float, batch_holds: bool
) -> None:
    # Near-full batches on every pod, no queue yet, TPOT missed: the pods are too few. The replica rule adds
    # pods and, where they bring the mean TPOT back under target along the cost curve, the batch rule leaves
    # the miss to them (cutting both sized the new fleet for a smaller batch). At max replicas no pod comes,
    # and a TPOT many times the target is too slow at any load the new pods leave: the batch rule cuts.
    spec = make_spec(max_replicas=max_replicas)
    observed = make_window(
        pods=4, running_per_pod=62.0, arrival_per_s=80.0, service_s=4.0, tpot_attainment=0.8, tpot_mean_s=tpot_mean_s
    )
    held = spec.batching.max_batch_size, spec.batching.max_batch_tokens
    decision = decide.decide(
        spec_mod.PolicyInput(spec, current_replicas=4, ready_replicas=4), observed, state.TunerState(), now=1000.0
    )
    assert (decision.replicas > 4) == (max_replicas > 4)
    if batch_holds:
        assert (decision.max_batch_size, decision.max_batch_tokens) == held
        assert any("while the replica rule adds pods" in r for r in decision.reasons), decision.reasons
    else:
        assert decision.max_batch_size < held[0]
