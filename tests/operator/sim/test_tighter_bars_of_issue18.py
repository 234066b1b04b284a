"""The tighter bars of issue #18 that the policy meets on the default GPU profile (seed 1): diurnal attainment
>= 99% at <= 1.15x the oracle's replica-minutes, and the interactive class >= 99% on class-mix. Batch limits
grow while TPOT at the running batch the replica rule sizes for (not at a full batch) has headroom, and a
TPOT miss while new pods settle no longer shrinks them: before, the day settled at 1.17-1.18x.

The step's recovery (3 intervals, bar 2), the step's cost (~1.19x, bar 1.15x) and the bursts' cost (~2.1x,
bar 1.8x) are printed by `fleetlm-dev simulate` and not met yet; see the issue note.
"""

from __future__ import annotations

import pytest

from fleetlm_operator.sim import bars, run, workload

SEED = 1


def _bar(key: str) -> bars.Bar:
    return next(bar for bar in bars.TIGHT_BARS if bar.key == key)


@pytest.fixture(scope="module")
def hpa_diurnal() -> run.Outcome:
    return run.simulate(workload.TRACES["diurnal"], run.POLICIES["hpa"], seed=SEED)


def test_diurnal_meets_99_percent_within_115_percent_of_the_oracle(diurnal_run: run.Outcome) -> None:
    assert diurnal_run.attainment >= bars.TIGHT_ATTAINMENT
    assert diurnal_run.cost_ratio <= bars.TIGHT_COST_RATIO
    assert _bar("tight-diurnal-attainment").judge(diurnal_run).passed
    assert _bar("tight-diurnal-cost").judge(diurnal_run).passed
    # ... without buying it with churn: the day still takes a few dozen changes at most.
    assert diurnal_run.num_changes <= 30


def test_the_interactive_class_meets_99_percent_on_class_mix(class_mix_run: run.Outcome) -> None:
    assert class_mix_run.attainment_by_class["interactive"] >= bars.TIGHT_INTERACTIVE_ATTAINMENT
    assert _bar("tight-class-mix-interactive").judge(class_mix_run).passed


def test_the_queue_depth_baseline_fails_them(hpa_diurnal: run.Outcome) -> None:
    # The bars discriminate: the HPA-style baseline on the same arrivals misses both diurnal bars.
    assert not _bar("tight-diurnal-attainment").judge(hpa_diurnal).passed
    assert not _bar("tight-diurnal-cost").judge(hpa_diurnal).passed


def test_every_tight_bar_is_judged_on_a_trace_the_simulator_has() -> None:
    assert {bar.trace for bar in bars.TIGHT_BARS} <= set(workload.TRACES)
    assert {bar.key for bar in bars.TIGHT_BARS}.isdisjoint(bar.key for bar in bars.BARS)
    assert set(bars.bars_for("step", tight=True)) > set(bars.bars_for("step"))
