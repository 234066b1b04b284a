"""Start-up the scaler understands: the tuner learns the pods' start-up time, counts loading pods as capacity
on the way (for at most twice that time), never scales up again for demand they will serve (the backlog they
will drain, the refusals clients will retry), and tells the start-up it learnt."""

from __future__ import annotations

import dataclasses

from fleetlm_dev.policy_inputs import MakeSpec, MakeWindow
from fleetlm_operator.policy import decide, replicas, startup, state, window
from fleetlm_operator.policy import spec as spec_mod

TUNING = spec_mod.Tuning(max_scale_up_factor=10.0)
BATCHING = spec_mod.BatchingBounds(max_batch_size=64, max_batch_tokens=4096, autotune=False)


def overloaded(make_window: MakeWindow) -> window.ObservedWindow:
    # 4 ready pods with full batches (64) and 40 waiting each, arrivals twice what they finish.
    return make_window(pods=4, running_per_pod=64.0, waiting_per_pod=40.0, arrival_per_s=128.0, service_s=4.0,
                       ttft_attainment=0.4, ttft_quantile_s=3.0)  # fmt: skip


def test_start_up_is_learnt_once_per_pod_and_smoothed() -> None:
    tuning = spec_mod.Tuning(startup_smoothing=0.5)
    first = startup.observe(startup.StartupStats(), [spec_mod.PodStartup("a", 60.0)], tuning=tuning)
    assert first.mean_s == 60.0 and first.count == 1
    again = startup.observe(first, [spec_mod.PodStartup("a", 60.0), spec_mod.PodStartup("b", 100.0)], tuning=tuning)
    assert again.mean_s == 80.0 and again.count == 2 and again.last_s == 100.0  # "a" not counted twice
    assert startup.expected_s(startup.StartupStats(), tuning=tuning) == tuning.startup_prior_s
    many = startup.observe(
        startup.StartupStats(), [spec_mod.PodStartup(f"p{i}", 10.0) for i in range(200)], tuning=tuning
    )
    assert len(many.pods) == startup.MAX_REMEMBERED_PODS and many.count == 200


def test_repeated_ticks_under_the_same_pressure_do_not_scale_up_again(
    make_spec: MakeSpec, make_window: MakeWindow
) -> None:
    spec = make_spec(tuning=TUNING, max_replicas=64, batching=BATCHING)
    observed = overloaded(make_window)
    learnt = state.TunerState(startup=startup.StartupStats(mean_s=60.0, count=1, last_s=60.0, pods=("old",)))
    first = decide.decide(
        spec_mod.PolicyInput(spec, current_replicas=4, ready_replicas=4), observed, learnt, now=1000.0
    )
    assert first.replicas > 4
    tuner = first.state
    # The same overloaded window, tick after tick, while the new pods load: hold, every time.
    for tick in range(1, 4):
        age = 15.0 * tick
        decision = decide.decide(
            spec_mod.PolicyInput(spec, current_replicas=first.replicas, ready_replicas=4,
                                 loading_ages_s=(age,) * (first.replicas - 4)),
            observed, tuner, now=1000.0 + age,
        )  # fmt: skip
        assert decision.replicas == first.replicas, decision.reasons
        assert any("loading" in r for r in decision.reasons)
        tuner = decision.state
    assert decision.startup_s == 60.0


def test_without_the_guard_the_same_ticks_would_cascade(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    # What the guard prevents: counted as ready-or-not pods only (no ages, backlog included), the same
    # window asks for more than the fleet already on its way.
    spec = make_spec(tuning=TUNING, max_replicas=64, batching=BATCHING)
    observed = overloaded(make_window)
    demand = replicas.estimate_demand(observed, tuning=spec.tuning)
    assert demand is not None
    with_backlog = replicas.wanted_replicas(demand, max_batch_size=64, tuning=spec.tuning)
    steady = dataclasses.replace(demand, slots=demand.concurrency_slots, backlog_slots=0.0)
    without = replicas.wanted_replicas(steady, max_batch_size=64, tuning=spec.tuning)
    assert with_backlog > without  # the backlog alone would have added pods on the next tick


def test_a_pod_loading_for_too_long_stops_counting(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    spec = make_spec(tuning=TUNING, max_replicas=64, batching=BATCHING)
    observed = overloaded(make_window)
    learnt = state.TunerState(startup=startup.StartupStats(mean_s=60.0, count=1, last_s=60.0, pods=("old",)))
    first = decide.decide(
        spec_mod.PolicyInput(spec, current_replicas=4, ready_replicas=4), observed, learnt, now=1000.0
    )
    loading = first.replicas - 4
    fine = decide.decide(
        spec_mod.PolicyInput(spec, current_replicas=first.replicas, ready_replicas=4,
                             loading_ages_s=(119.0,) * loading),
        observed, first.state, now=1119.0,
    )  # fmt: skip
    assert fine.replicas == first.replicas
    # Past 2 x 60 s they are stuck (crash loop, unschedulable): they no longer count, and replacements for
    # them are asked for on top of what the demand needs.
    stuck = decide.decide(
        spec_mod.PolicyInput(spec, current_replicas=first.replicas, ready_replicas=4,
                             loading_ages_s=(121.0,) * loading),
        observed, first.state, now=1121.0,
    )  # fmt: skip
    assert stuck.replicas > first.replicas, stuck.reasons
    assert any(f"{loading} loading > 120s, not counted" in r for r in stuck.reasons)


def test_new_demand_beyond_the_pods_on_their_way_still_scales_up(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    spec = make_spec(tuning=TUNING, max_replicas=64, batching=BATCHING)
    observed = overloaded(make_window)
    first = decide.decide(spec_mod.PolicyInput(spec, current_replicas=4, ready_replicas=4), observed,
                          state.TunerState(), now=1000.0)  # fmt: skip
    doubled = dataclasses.replace(observed, arrival_per_s=2 * (observed.arrival_per_s or 0.0))
    more = decide.decide(
        spec_mod.PolicyInput(spec, current_replicas=first.replicas, ready_replicas=4,
                             loading_ages_s=(15.0,) * (first.replicas - 4)),
        doubled, first.state, now=1015.0,
    )  # fmt: skip
    assert more.replicas > first.replicas


def test_refusals_that_clients_retry_are_counted_once(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    spec = make_spec()
    base = make_window(pods=4, running_per_pod=64.0, waiting_per_pod=32.0, arrival_per_s=64.0, service_s=4.0)
    refused = 30.0  # each of 10 refused requests/s tried 3 times
    retried = dataclasses.replace(base, arrival_per_s=64.0 + refused, rejected_per_s=refused)
    once = dataclasses.replace(base, arrival_per_s=64.0 + refused / 3, rejected_per_s=refused / 3)
    tuning = spec.tuning
    a = replicas.estimate_demand(retried, tuning=tuning)
    b = replicas.estimate_demand(once, tuning=dataclasses.replace(tuning, refusal_attempts=1.0))
    assert a is not None and b is not None
    assert abs(a.concurrency_slots - b.concurrency_slots) < 1e-6
