"""Bar (issue #14, point 4): the 1x -> 4x step with 60 s pod start-ups. The tuner scales up once, counts the
loading pods as capacity and does not scale up again while they load, peaks no higher than the oracle's count
with the cost bar's headroom (and here no higher than it settles), recovers within the step bar counted from
when the new pods can serve, then holds still. The HPA baseline, which sees only the queue, cascades on the
same arrivals."""

from __future__ import annotations

import pytest

from fleetlm_dev.sim import bars, run, workload

pytestmark = pytest.mark.slow


def test_the_trace_has_60s_start_ups(startup60_run: run.Outcome) -> None:
    assert startup60_run.startup_s == 60.0
    # New pods really took 60 s: some tick saw pods loading for four intervals in a row.
    loading = [t.starting for t in startup60_run.ticks if 600.0 < t.t_s <= 660.0]
    assert len(loading) == 4 and min(loading) > 0


def test_no_scale_up_while_pods_load_and_no_overshoot(startup60_run: run.Outcome) -> None:
    seen = bars.overshoot(startup60_run, step_at_s=600.0, steady_from_s=1500.0)
    assert seen.ups_while_loading == 0
    assert seen.peak <= bars.overshoot_limit(seen.oracle) == 13
    assert seen.oracle == 10 and seen.peak > 4  # it did react to the step
    assert seen.peak <= seen.settled  # and went straight to where it settles, no higher
    (bar,) = (b for b in bars.BARS if b.key == "startup60-overshoot")
    assert bar.judge(startup60_run).passed


def test_recovery_within_the_step_bar_after_the_start_up(startup60_run: run.Outcome) -> None:
    assert startup60_run.recovery_intervals is not None
    assert startup60_run.recovery_intervals <= bars.RECOVERY_INTERVALS + bars.startup_allowance(startup60_run)
    # The step did hurt (nothing can serve the new load for a minute), so the bar measures something.
    assert startup60_run.recovery_intervals > bars.RECOVERY_INTERVALS


def test_every_startup60_bar_passes_and_the_hpa_baseline_cascades(startup60_run: run.Outcome) -> None:
    for bar in bars.bars_for("startup60"):
        assert bar.judge(startup60_run).passed, (bar.key, bar.judge(startup60_run).value)
    hpa = run.simulate(workload.TRACES["startup60"], run.POLICIES["hpa"], seed=1)
    seen = bars.overshoot(hpa, step_at_s=600.0, steady_from_s=1500.0)
    assert seen.ups_while_loading > 0
