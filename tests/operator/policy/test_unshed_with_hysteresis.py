"""A shed class comes back only once the whole demand, refused arrivals included, fits well under max
replicas with the SLO met, continuously for the hold time; the last class shed comes back first."""

from __future__ import annotations

from fleetlm_dev.policy_inputs import THREE_CLASSES as CLASSES
from fleetlm_dev.policy_inputs import MakeSpec, MakeWindow
from fleetlm_operator.policy import decide, state, window
from fleetlm_operator.policy import spec as spec_mod


def calm(
    make_window: MakeWindow, *, now: float, refused_per_s: float, attainment: float = 1.0
) -> window.ObservedWindow:
    """4 pods at max, light load; the shed classes' clients are being refused at `refused_per_s` each."""
    classes = {
        "interactive": window.ClassWindow("interactive", 300, 0.1, 0.03, attainment, 1.0, 5.0, 0.0, 40.0, 0.0),
        "batch": window.ClassWindow("batch", 0, None, None, None, None, 0.0, refused_per_s, 0.0, 0.0),
        "bulk": window.ClassWindow("bulk", 0, None, None, None, None, 0.0, refused_per_s, 0.0, 0.0),
    }
    # As window.build counts them, arrivals include refusals: 10/s served plus what both classes are refused.
    return make_window(
        pods=4,
        running_per_pod=10.0,
        end_s=now,
        classes=classes,
        ttft_attainment=attainment,
        arrival_per_s=10.0 + 2 * refused_per_s,
    )


def run(
    spec: spec_mod.PolicySpec,
    make_window: MakeWindow,
    *,
    refused: list[float],
    misses_at: set[int] = frozenset(),
    start: state.TunerState,
) -> list[tuple[str, ...]]:
    tuner = start
    shed_over_time = []
    for tick, refused_per_s in enumerate(refused):
        now = 1000.0 + tick * spec.interval_s
        observed = calm(make_window, now=now, refused_per_s=refused_per_s, attainment=0.5 if tick in misses_at else 1.0)
        decision = decide.decide(spec_mod.PolicyInput(spec, 4, 4), observed, tuner, now=now)
        tuner = decision.state
        shed_over_time.append(decision.shed_classes)
    return shed_over_time


def test_classes_come_back_after_the_hold_last_shed_first(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    spec = make_spec(max_replicas=4, classes=CLASSES)
    start = state.TunerState(shed_classes=("bulk", "batch"), shed_changed_s=0.0)
    timeline = run(spec, make_window, refused=[1.0] * 50, start=start)
    hold_ticks = int(spec.scale_down_stabilization_s // spec.interval_s)
    cooldown_ticks = spec.tuning.shed_cooldown_intervals
    # Clear from the first tick: batch (shed last) comes back after one hold ...
    assert timeline.index(("bulk",)) == hold_ticks
    # ... and bulk only after the cooldown of that change and a hold of its own.
    assert timeline.index(()) == hold_ticks + cooldown_ticks + hold_ticks
    assert ("bulk", "batch") not in timeline[hold_ticks:]


def test_a_heavy_refused_demand_keeps_the_class_shed(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    spec = make_spec(max_replicas=4, classes=CLASSES)
    start = state.TunerState(shed_classes=("bulk",), shed_changed_s=0.0)
    # Refused arrivals that would fill max replicas past the unshed occupancy if let back in.
    timeline = run(spec, make_window, refused=[60.0] * 40, start=start)
    assert all(shed == ("bulk",) for shed in timeline)


def test_a_miss_during_the_hold_restarts_it(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    spec = make_spec(max_replicas=4, classes=CLASSES)
    start = state.TunerState(shed_classes=("bulk",), shed_changed_s=0.0)
    hold_ticks = int(spec.scale_down_stabilization_s // spec.interval_s)
    timeline = run(spec, make_window, refused=[1.0] * 60, misses_at={15}, start=start)
    back = timeline.index(())
    assert back >= 15 + hold_ticks
