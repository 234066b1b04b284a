"""The bars of issue #8 (point 4), judged on simulator outcomes. Decides nothing about tuning; no I/O.

- step: per-interval SLO attainment (requests by arrival time) back at or above target within 3 tuning
  intervals of the 1x -> 4x step, and staying there for the rest of the trace;
- steady: zero replica changes over the 30 minutes of steady 4x load that follow 15 minutes of settling;
- diurnal: SLO attainment >= target (95%) over the whole day, with replica-minutes (starting and
  draining pods included) at most 1.25x the oracle's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from fleetlm_operator.sim import run

RECOVERY_INTERVALS = 3
STEADY_CHANGES = 0
DIURNAL_COST_RATIO = 1.25


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    value: str
    passed: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Bar:
    key: str
    trace: str
    description: str
    judge: Callable[[run.Outcome], Verdict]


def _recovery(outcome: run.Outcome) -> Verdict:
    intervals = outcome.recovery_intervals
    if intervals is None:
        return Verdict("n/a", False)
    return Verdict(f"{intervals} intervals", intervals <= RECOVERY_INTERVALS)


def _steady(outcome: run.Outcome) -> Verdict:
    changes = outcome.steady_changes
    if changes is None:
        return Verdict("n/a", False)
    return Verdict(f"{changes} changes", changes <= STEADY_CHANGES)


def _attainment(outcome: run.Outcome) -> Verdict:
    return Verdict(f"{outcome.attainment:.2%}", outcome.attainment >= outcome.attainment_target)


def _cost(outcome: run.Outcome) -> Verdict:
    ratio = outcome.cost_ratio
    return Verdict(f"{ratio:.2f}x oracle", ratio <= DIURNAL_COST_RATIO)


BARS: tuple[Bar, ...] = (
    Bar(
        "step-recovery",
        "step",
        f"step 1x->4x: attainment back >= target within {RECOVERY_INTERVALS} intervals",
        _recovery,
    ),
    Bar("steady-changes", "step", "steady 4x, 30 min after settling: zero replica changes", _steady),
    Bar("diurnal-attainment", "diurnal", "diurnal: SLO attainment >= 95%", _attainment),
    Bar("diurnal-cost", "diurnal", f"diurnal: replica-minutes <= {DIURNAL_COST_RATIO}x oracle", _cost),
)


def bars_for(trace: str) -> tuple[Bar, ...]:
    return tuple(bar for bar in BARS if bar.trace == trace)
