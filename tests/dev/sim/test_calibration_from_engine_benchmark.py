"""The simulator can be calibrated from the engine benchmark's measured step times."""

from __future__ import annotations

import pytest

from fleetlm_dev.sim import calibration


def _report(points: list[tuple[int, float]]) -> dict:
    return {
        "cpu": "test",
        "models": [
            {
                "model": "builtin:tiny",
                "concurrency": [{"concurrency": size, "full_decode_step_p50_ms": step_ms} for size, step_ms in points],
            }
        ],
    }


def test_step_time_follows_the_measured_line() -> None:
    # step_ms = 0.5 + 0.05 x batch: what a linear engine would measure
    calib = calibration.from_engine_benchmark(
        _report([(1, 0.55), (8, 0.9), (32, 2.1), (64, 3.7)]), model="builtin:tiny"
    )
    assert calib.name == "measured:builtin:tiny"
    assert calib.step.base_s == pytest.approx(0.0005, rel=0.05)
    # one decode row plus its token: the measured slope per sequence
    assert calib.step.per_seq_s + calib.step.per_token_s == pytest.approx(0.00005, rel=0.05)


def test_unknown_model_or_too_few_points_are_refused() -> None:
    with pytest.raises(ValueError, match="no model 'builtin:small'"):
        calibration.from_engine_benchmark(_report([(1, 1.0), (8, 2.0)]), model="builtin:small")
    with pytest.raises(ValueError, match="two or more"):
        calibration.from_engine_benchmark(_report([(1, 1.0)]), model="builtin:tiny")
