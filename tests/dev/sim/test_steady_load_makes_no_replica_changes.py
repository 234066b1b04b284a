"""Bar: 30 simulated minutes of steady 4x load after 15 minutes of settling: zero replica changes."""

from __future__ import annotations

import pytest

from fleetlm_dev.sim import bars, run, workload

pytestmark = pytest.mark.slow


def test_no_replica_changes_in_thirty_steady_minutes(step_run: run.Outcome) -> None:
    trace = workload.TRACES["step"]
    assert trace.steady_to_s is not None and trace.steady_from_s is not None
    assert trace.steady_to_s - trace.steady_from_s >= 30 * 60
    assert step_run.steady_changes == 0
    assert bars.BARS[1].judge(step_run).passed


def test_the_fleet_did_change_before_settling(step_run: run.Outcome) -> None:
    # The zero above is not a fleet that never moves: it scaled for the step and back down after.
    assert step_run.num_changes >= 3


def test_steady_fleet_sits_close_to_the_oracle(step_run: run.Outcome) -> None:
    steady = [t for t in step_run.ticks if t.t_s >= 1500.0]
    assert all(t.replicas <= 1.4 * t.oracle for t in steady)
    assert all(t.replicas >= t.oracle for t in steady)
