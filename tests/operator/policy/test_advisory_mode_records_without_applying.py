"""Advisory mode: the policy decides exactly as in act mode, but the state it carries keeps what is in force."""

from __future__ import annotations

import dataclasses

from fleetlm_dev.policy_inputs import MakeSpec, MakeWindow
from fleetlm_operator.policy import decide, state, window
from fleetlm_operator.policy import spec as spec_mod


def overloaded(make_window: MakeWindow) -> window.ObservedWindow:
    return make_window(
        pods=4,
        running_per_pod=64.0,
        waiting_per_pod=40.0,
        arrival_per_s=128.0,
        service_s=4.0,
        ttft_attainment=0.4,
        ttft_quantile_s=3.0,
        tpot_quantile_s=0.2,
        tpot_attainment=0.5,
    )


def test_advice_is_the_decision_act_mode_would_take(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    observed = overloaded(make_window)
    acted = decide.decide(
        spec_mod.PolicyInput(make_spec(), current_replicas=4, ready_replicas=4),
        observed,
        state.TunerState(),
        now=1000.0,
    )
    advised = decide.decide(
        spec_mod.PolicyInput(make_spec(advise=True), current_replicas=4, ready_replicas=4),
        observed,
        state.TunerState(),
        now=1000.0,
    )
    assert advised.replicas == acted.replicas > 4
    assert (advised.max_batch_size, advised.max_batch_tokens) == (acted.max_batch_size, acted.max_batch_tokens)
    assert advised.shed_classes == acted.shed_classes
    assert "advisory mode: decision recorded, not applied" in advised.reasons
    assert "advisory mode: decision recorded, not applied" not in acted.reasons


def test_advised_state_keeps_what_is_in_force_and_learns_the_rest(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    before = state.TunerState(
        max_batch_size=64,
        max_batch_tokens=4096,
        batch_changed_s=10.0,
        batch_direction=1,
        last_replicas=4,
        last_scale_s=20.0,
    )
    advised = decide.decide(
        spec_mod.PolicyInput(make_spec(advise=True), current_replicas=4, ready_replicas=4),
        overloaded(make_window),
        before,
        now=1000.0,
    )
    acted = decide.decide(
        spec_mod.PolicyInput(make_spec(), current_replicas=4, ready_replicas=4),
        overloaded(make_window),
        before,
        now=1000.0,
    )
    # Act mode moves the limits and records the scale; advise records neither, as nothing was applied.
    assert (acted.state.max_batch_size, acted.state.last_scale_s) != (64, 20.0)
    kept = advised.state
    assert (kept.max_batch_size, kept.max_batch_tokens, kept.batch_changed_s, kept.batch_direction) == (
        64,
        4096,
        10.0,
        1,
    )
    assert (kept.last_replicas, kept.last_scale_s) == (4, 20.0)
    # ... but what the data taught (this tick's recommendation, the cost curve's window) is kept.
    assert kept.recommendations == acted.state.recommendations
    assert kept.cost == acted.state.cost
    assert kept.updated_s == 1000.0


def test_switching_to_act_applies_the_current_decision_at_once(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    # Ten advisory ticks of overload change nothing in force; the first act tick scales as a fresh tuner would.
    observed = overloaded(make_window)
    carried = state.TunerState()
    for tick in range(10):
        advised = decide.decide(
            spec_mod.PolicyInput(make_spec(advise=True), current_replicas=4, ready_replicas=4),
            dataclasses.replace(observed, end_s=1000.0 + 15 * tick),
            carried,
            now=1000.0 + 15 * tick,
        )
        carried = advised.state
    assert carried.max_batch_size is None and carried.last_scale_s is None
    now = 1000.0 + 15 * 10
    acted = decide.decide(
        spec_mod.PolicyInput(make_spec(), current_replicas=4, ready_replicas=4),
        dataclasses.replace(observed, end_s=now),
        carried,
        now=now,
    )
    assert acted.replicas == advised.replicas > 4
    assert acted.state.last_scale_s == now
