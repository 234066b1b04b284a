"""One scrape of the running gauge is one instant of a count that swings about like a Poisson variable; as a
floor on the demand to scale up on it counts only beyond that swing. A scale-down still has to clear the gauge as
read (each direction acts on the estimate that is conservative for it).

The demo (`make demo`, builtin:tiny on CPU, batches of 4) scaled 1 -> 3 five seconds into a calm phase at half a
replica's capacity: arrivals 60.08/s x service 0.03 s is 1.8 sequences in flight, but the scrape caught a full
batch of 4 and the gauge, taken as a floor, made the demand 4 slots.
"""

from __future__ import annotations

import dataclasses
import math

from fleetlm_dev import policy_inputs
from fleetlm_dev.policy_inputs import MakeSpec, MakeWindow
from fleetlm_operator.policy import decide, replicas, slo, state
from fleetlm_operator.policy import spec as spec_mod
from fleetlm_operator.policy import window as window_mod


def _demo_spec(make_spec: MakeSpec) -> spec_mod.PolicySpec:
    return make_spec(
        min_replicas=1,
        max_replicas=3,
        interval_s=5.0,
        scale_down_stabilization_s=30.0,
        batching=policy_inputs.DEMO_BATCHING,
    )


def slo_met(observed: window_mod.ObservedWindow, spec: spec_mod.PolicySpec) -> slo.SLOAssessment:
    return slo.assess(observed, spec=spec)


def _gauge_reads(
    make_window: MakeWindow, *, pods: int, running: float, arrival_per_s: float, service_s: float
) -> window_mod.ObservedWindow:
    """A window whose finishes match its arrivals (Little: arrivals x service in flight on average) while the
    gauge at its end reads `running` sequences over the fleet."""
    observed = make_window(pods=pods, running_per_pod=running / pods, arrival_per_s=arrival_per_s, service_s=service_s)
    return dataclasses.replace(observed, finished_per_s=arrival_per_s)


def test_the_demos_full_batch_at_one_scrape_does_not_ask_for_three_replicas(
    make_spec: MakeSpec, make_window: MakeWindow
) -> None:
    spec = _demo_spec(make_spec)
    observed = _gauge_reads(make_window, pods=1, running=4.0, arrival_per_s=60.08, service_s=0.03)
    demand = replicas.estimate_demand(observed, tuning=spec.tuning, beyond_swing=True)
    assert demand is not None
    assert math.isclose(demand.concurrency_slots, 60.08 * 0.03)  # Little's estimate, not the scrape's 4
    assert demand.basis.startswith("arrivals")
    decision = decide.decide(
        spec_mod.PolicyInput(spec, current_replicas=1, ready_replicas=1), observed, state.TunerState(), now=1000.0
    )
    # What 1.8 in flight asks of the batches the tuner sets (the band leaves room for their swing), not what 4
    # asks: 3 replicas, as the demo did.
    wanted = replicas.wanted_replicas(demand, max_batch_size=decision.max_batch_size, tuning=spec.tuning)
    assert decision.replicas == max(1, wanted) < 3
    assert "the gauge as read, 4 slots, for scale-down" in " ".join(decision.reasons)


def test_a_gauge_clear_of_its_swing_still_floors_the_demand(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    # Requests running far longer than those that finished (a step under way): the window's finishes lag, and
    # the gauge says more is in flight than its own swing explains.
    spec = make_spec()
    observed = _gauge_reads(make_window, pods=4, running=200.0, arrival_per_s=10.0, service_s=4.0)
    demand = replicas.estimate_demand(observed, tuning=spec.tuning, beyond_swing=True)
    assert demand is not None
    floor = replicas.gauge_floor(200.0, tuning=spec.tuning)
    assert math.isclose(floor, 200.0 - spec.tuning.fluctuation_z * math.sqrt(200.0))
    assert 10.0 * 4.0 < demand.concurrency_slots == floor < 200.0
    assert demand.basis.startswith("running 200")
    assert math.isclose(demand.running_per_pod, 50.0)  # the batch the gauge saw, which the slowdown is taken at


def test_within_the_swing_the_windows_estimate_stands(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    # Steady load: the gauge a little above Little's estimate, as often as below it.
    spec = make_spec()
    observed = _gauge_reads(make_window, pods=3, running=132.0, arrival_per_s=24.6, service_s=5.16)
    demand = replicas.estimate_demand(observed, tuning=spec.tuning, beyond_swing=True)
    assert demand is not None
    assert math.isclose(demand.concurrency_slots, 24.6 * 5.16)
    # The estimate a scale-down must clear takes the gauge as read.
    as_read = replicas.estimate_demand(observed, tuning=spec.tuning)
    assert as_read is not None and as_read.concurrency_slots == 132.0
    assert replicas.gauge_floor(0.0, tuning=spec.tuning) == 0.0
    assert replicas.gauge_floor(4.0, tuning=spec.tuning) == 0.0  # 4 - 3 x 2 < 0: a full batch of 4 vouches for nothing


def test_a_scale_down_must_clear_the_gauge_as_read(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    # Two replicas, a long clean history of little work: one replica would carry Little's estimate, but the
    # scrape reads more running than one replica's batch should hold. The swing buys no pods; it does keep one.
    spec = make_spec(max_replicas=4)
    observed = _gauge_reads(make_window, pods=2, running=40.0, arrival_per_s=6.0, service_s=4.0)
    as_read = replicas.estimate_demand(observed, tuning=spec.tuning)
    up = replicas.estimate_demand(observed, tuning=spec.tuning, beyond_swing=True)
    assert as_read is not None and up is not None and up.concurrency_slots < as_read.concurrency_slots
    history = tuple(
        state.Recommendation(at_s=1000.0 - 15.0 * k, replicas=1, work=replicas.work(up, tuning=spec.tuning))
        for k in range(1, 21)
    )
    common = dict(
        assessment=slo_met(observed, spec),
        max_batch_size=64,
        recommendations=history,
        history_start_s=0.0,
        shedding=False,
        now=1000.0,
    )
    policy_input = spec_mod.PolicyInput(spec, current_replicas=2, ready_replicas=2)
    held = replicas.decide_replicas(policy_input, observed, demand=as_read, demand_up=up, **common)
    assert held.replicas == 2, held.reasons
    assert held.recommendations[-1].work == replicas.work(as_read, tuning=spec.tuning)
    # Had the swing-free estimate been the one recorded, the same tick would have let the pod go.
    down = replicas.decide_replicas(policy_input, observed, demand=up, demand_up=up, **common)
    assert down.replicas == 1, down.reasons
