"""Pods a burst bought go back once the burst is over, not a stabilization window later, and never below the
fleet from before it; a scale-up on load that stays gives nothing back before the window has passed."""

from __future__ import annotations

from collections.abc import Callable

from fleetlm_dev.policy_inputs import MakeSpec, MakeWindow
from fleetlm_operator.policy import decide, state
from fleetlm_operator.policy import spec as spec_mod

QUIET_RUNNING = 100.0  # four 64-sequence pods running ~40% full
BURST_RUNNING = 400.0  # what the burst would run with the room: the pods are full and a queue builds
FIXED_BATCH = spec_mod.BatchingBounds(max_batch_size=64, max_batch_tokens=4096, autotune=False)


def replay(
    spec: spec_mod.PolicySpec, make_window: MakeWindow, load: Callable[[float], float], *, until_s: float
) -> list[tuple[float, int, tuple[str, ...]]]:
    """Tick every interval, the fleet following each decision at once: (time, replicas, reasons) per tick."""
    current, tuner, now = 4, state.TunerState(), 0.0
    seen: list[tuple[float, int, tuple[str, ...]]] = []
    while now <= until_s:
        total = load(now)
        capacity = 64.0 * current
        running = min(total, 0.95 * capacity)
        observed = make_window(
            pods=current,
            running_per_pod=running / current,
            waiting_per_pod=(total - running) / current,
            ttft_attainment=1.0 if total <= running else 0.4,
            end_s=now,
        )
        decision = decide.decide(spec_mod.PolicyInput(spec, current, current), observed, tuner, now=now)
        tuner, current = decision.state, decision.replicas
        seen.append((now, current, decision.reasons))
        now += spec.interval_s
    return seen


def test_the_burst_pods_go_back_two_ticks_after_the_burst(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    spec = make_spec(batching=FIXED_BATCH)

    def load(t: float) -> float:
        return BURST_RUNNING if 600.0 <= t < 660.0 else QUIET_RUNNING

    seen = replay(spec, make_window, load, until_s=900.0)
    by_time = {t: n for t, n, _ in seen}
    assert by_time[585.0] == 4
    peak = max(n for t, n, _ in seen if 600.0 <= t < 660.0)
    assert peak > 4  # the burst was answered with pods
    # The first quiet tick (660) and the next are clean; the second gives the pods back, to the fleet from
    # before the burst, 255 s before the stabilization window would have allowed a scale-down.
    assert by_time[660.0] == peak  # one quiet tick is not yet a burst that is over
    assert by_time[675.0] == 4
    assert all(n == 4 for t, n, _ in seen if t >= 675.0)
    released = next(r for t, _, reasons in seen if t == 675.0 for r in reasons if r.startswith("replicas:"))
    assert "release" in released and "surge" in released


def test_load_that_stays_keeps_its_pods_for_the_window(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    spec = make_spec(batching=FIXED_BATCH)

    def load(t: float) -> float:
        return BURST_RUNNING if t >= 600.0 else QUIET_RUNNING

    seen = replay(spec, make_window, load, until_s=1200.0)
    settled = [n for t, n, _ in seen if t >= 660.0]
    assert min(settled) == max(settled) > 4  # no release, no cycle: the demand that bought them is still there


def test_the_surge_survives_a_restart(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    surge = state.TunerState(surge=state.Surge(at_s=600.0, base=4, work=250.0))
    assert state.TunerState.from_json(surge.to_json()).surge == surge.surge
    assert state.TunerState.from_json(state.TunerState().to_json()).surge is None
