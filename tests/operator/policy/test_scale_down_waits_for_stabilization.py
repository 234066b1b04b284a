"""Scale-down waits for a full stabilization window of clean ticks, then steps one replica per tick."""

from __future__ import annotations

from fleetlm_dev.policy_inputs import MakeSpec, MakeWindow
from fleetlm_operator.policy import decide, state
from fleetlm_operator.policy import spec as spec_mod

TOTAL_RUNNING = 60.0  # light load: a couple of replicas' worth of 64-sequence batches


def replay(
    spec: spec_mod.PolicySpec,
    make_window: MakeWindow,
    *,
    start_replicas: int,
    until_s: float,
    broken_at_s: float | None = None,
    tuner: state.TunerState | None = None,
    from_s: float = 0.0,
) -> tuple[list[tuple[float, int]], state.TunerState]:
    """Tick every interval; the fleet follows each decision at once. Returns (time, replicas) per tick."""
    current = start_replicas
    tuner = tuner or state.TunerState()
    seen: list[tuple[float, int]] = []
    now = from_s
    while now <= until_s:
        broken = broken_at_s is not None and abs(now - broken_at_s) < 1e-6
        observed = make_window(
            pods=current,
            running_per_pod=TOTAL_RUNNING / current,
            complete=not broken,
            reason="1/4 pods scraped (missing: p1)" if broken else "",
            end_s=now,
        )
        decision = decide.decide(spec_mod.PolicyInput(spec, current, current), observed, tuner, now=now)
        tuner = decision.state
        current = decision.replicas
        seen.append((now, current))
        now += spec.interval_s
    return seen, tuner


def first_change_s(seen: list[tuple[float, int]], start: int) -> float | None:
    return next((t for t, n in seen if n != start), None)


def test_nothing_moves_before_the_window_then_one_step_per_tick(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    spec = make_spec()
    seen, _ = replay(spec, make_window, start_replicas=8, until_s=420.0)
    assert first_change_s(seen, 8) == spec.scale_down_stabilization_s
    steps = [b - a for (_, a), (_, b) in zip([(0.0, 8), *seen], seen, strict=False)]
    assert all(step in (0, -1) for step in steps)  # never more than one replica at a time
    after = [n for t, n in seen if t >= spec.scale_down_stabilization_s]
    assert after[:3] == [7, 6, 5]  # then one step on each tick while the data keeps asking


def test_the_descent_stops_where_load_would_fill_the_smaller_fleet(
    make_spec: MakeSpec, make_window: MakeWindow
) -> None:
    spec = make_spec()
    seen, _ = replay(spec, make_window, start_replicas=8, until_s=1200.0)
    final = seen[-1][1]
    assert final >= spec.min_replicas
    assert final == seen[-10][1]  # settled: no more changes over the last ten ticks
    assert 1 <= final < 8


def test_a_broken_tick_restarts_the_wait(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    spec = make_spec()
    seen, _ = replay(spec, make_window, start_replicas=8, until_s=700.0, broken_at_s=195.0)
    first = first_change_s(seen, 8)
    assert first is not None
    assert first == 195.0 + spec.scale_down_stabilization_s  # the broken tick blocks one full window


def test_longer_stabilization_waits_longer(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    spec = make_spec(scale_down_stabilization_s=600.0)
    seen, _ = replay(spec, make_window, start_replicas=8, until_s=700.0)
    assert first_change_s(seen, 8) == 600.0
