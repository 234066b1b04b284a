"""Past max replicas the sheddable class is refused, and the protected class keeps its SLO."""

from __future__ import annotations

import pytest

from fleetlm_dev.sim import run

pytestmark = pytest.mark.slow


def test_batch_is_shed_and_interactive_keeps_its_slo(class_mix_run: run.Outcome) -> None:
    assert class_mix_run.num_shed["batch"] > 0
    assert class_mix_run.num_shed["interactive"] == 0
    assert class_mix_run.attainment_by_class["interactive"] >= 0.95
    shed_ticks = [t for t in class_mix_run.ticks if t.shed]
    assert shed_ticks
    assert all(t.replicas == 6 for t in shed_ticks)  # only ever at max replicas


def test_batch_comes_back_when_the_load_falls(class_mix_run: run.Outcome) -> None:
    assert class_mix_run.ticks[-1].shed == ()
