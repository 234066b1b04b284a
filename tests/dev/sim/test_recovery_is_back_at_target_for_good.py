"""Step recovery, as every policy's column counts it: intervals until attainment is back at target and stays
there for the rest of the plateau (the attainment of the requests sent since recovery is at target at every
later point), not the last interval below target anywhere on the plateau."""

from __future__ import annotations

import numpy as np

from fleetlm_dev.sim import run

TARGET = 0.95


def _recovery(attainment: list[float], *, sent: int = 1000) -> int:
    totals = np.full(len(attainment), sent, dtype=float)
    return run.recovery_intervals(np.array(attainment) * totals, totals, target=TARGET)


def test_the_intervals_before_the_service_is_back() -> None:
    assert _recovery([0.0, 0.0, 0.8] + [0.99] * 60) == 3
    assert _recovery([0.99] * 60) == 0


def test_a_lone_dip_the_service_since_absorbs_is_not_recovery() -> None:
    # One interval at 94.6% twenty minutes into a plateau served at 99%: recovered after 3 intervals.
    plateau = [0.0, 0.0, 0.8] + [0.99] * 80 + [0.946] + [0.99] * 40
    assert _recovery(plateau) == 3


def test_a_run_of_poor_intervals_moves_the_recovery_past_it() -> None:
    # Back at 99% for a while, then a stretch at 80% long enough to pull the attainment since under 95%:
    # the service had not recovered for good, whatever it did in between.
    plateau = [0.0, 0.0] + [0.99] * 10 + [0.8] * 5 + [0.99] * 60
    assert _recovery(plateau) == 17
    # ... and an interval below target right after the first good one is still part of the recovery.
    assert _recovery([0.0, 0.97, 0.5] + [0.99] * 60) == 3


def test_never_back_counts_the_whole_plateau() -> None:
    assert _recovery([0.0] + [0.9] * 30) == 31


def test_intervals_without_requests_are_not_judged() -> None:
    totals = np.array([100.0, 0.0, 100.0, 100.0])
    good = np.array([0.0, 0.0, 99.0, 99.0])
    assert run.recovery_intervals(good, totals, target=TARGET) == 1
