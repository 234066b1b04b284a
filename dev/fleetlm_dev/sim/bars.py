"""The bars of issue #8 (point 4), judged on simulator outcomes. Decides nothing about tuning; no I/O.

- step: per-interval SLO attainment (requests by arrival time) back at or above target within 3 tuning
  intervals of the 1x -> 4x step, and staying there for the rest of the trace: from the interval it is back,
  the attainment of the requests sent since is at target at every later point of the plateau
  (`run.recovery_intervals`: a lone dip the service since absorbs is not the step still being recovered
  from; a run of poor intervals is);
- steady: zero replica changes over the 30 minutes of steady 4x load that follow 15 minutes of settling;
- diurnal: SLO attainment >= target (95%) over the whole day, with replica-minutes (starting and
  draining pods included) at most 1.25x the oracle's.

And of issue #14 (point 4), on the same step with 60 s start-ups (`startup60`):

- no overshoot: no scale-up while the step's pods are still loading (no 2 -> 4 -> 8 cascade), and the
  peak (loading pods included) is not above the oracle's count by more than the headroom the cost bar
  grants (1.25x, rounded up: the policy runs batches at its target occupancy, the oracle at the SLO's
  edge, so even its settled fleet is above the oracle's count);
- recovery: the step bar counted from when a pod asked for at the step can first serve, i.e. within
  3 intervals plus the start-up in intervals (the oracle has no start-up; no policy can beat it);
- steady: zero replica changes over the steady window, as for the step.

And the tighter bars of issue #18 (point 5), judged beside those (`TIGHT_BARS`, keys prefixed `tight-`):

- step: recovery within 2 intervals; replica-minutes at most 1.15x the oracle's;
- diurnal: attainment >= 99%, replica-minutes at most 1.15x the oracle's;
- bursts: replica-minutes at most 1.8x the oracle's;
- class-mix: the interactive (unsheddable, most urgent) class's attainment >= 99%;
- startup60: recovery within 2 intervals plus the start-up.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable

from fleetlm_dev.sim import run, workload

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


def startup_allowance(outcome: run.Outcome) -> int:
    """Intervals a pod asked for at the step needs before it can serve."""
    return math.ceil(outcome.startup_s / outcome.interval_s - 1e-9)


def _recovery_after_startup(outcome: run.Outcome) -> Verdict:
    intervals = outcome.recovery_intervals
    if intervals is None:
        return Verdict("n/a", False)
    limit = RECOVERY_INTERVALS + startup_allowance(outcome)
    return Verdict(f"{intervals} intervals (<= {limit})", intervals <= limit)


@dataclasses.dataclass(frozen=True, slots=True)
class Overshoot:
    peak: int  # most replicas (loading included) from the step on
    settled: int  # most replicas in the steady window
    oracle: int  # the oracle's count after the step
    ups_while_loading: int  # scale-ups decided while pods were still loading


def overshoot(outcome: run.Outcome, *, step_at_s: float, steady_from_s: float) -> Overshoot:
    after = [t for t in outcome.ticks if t.t_s >= step_at_s]
    steady = [t for t in after if t.t_s >= steady_from_s] or after[-1:]
    ups = sum(1 for before, now in itertools.pairwise(after) if before.starting > 0 and now.replicas > before.replicas)
    return Overshoot(
        peak=max(t.replicas for t in after),
        settled=max(t.replicas for t in steady),
        oracle=max(t.oracle for t in after),
        ups_while_loading=ups,
    )


def _no_overshoot(outcome: run.Outcome) -> Verdict:
    trace = workload.TRACES.get(outcome.trace)
    if trace is None or trace.step_at_s is None or trace.steady_from_s is None or not outcome.ticks:
        return Verdict("n/a", False)
    o = overshoot(outcome, step_at_s=trace.step_at_s, steady_from_s=trace.steady_from_s)
    limit = overshoot_limit(o.oracle)
    passed = o.ups_while_loading == 0 and o.peak <= limit
    return Verdict(
        f"peak {o.peak} (<= {limit}), settled {o.settled}, oracle {o.oracle}, {o.ups_while_loading} up(s) loading",
        passed,
    )


def overshoot_limit(oracle: int) -> int:
    """The most replicas a step may peak at: the oracle's count with the cost bar's headroom."""
    return math.ceil(oracle * DIURNAL_COST_RATIO - 1e-9)


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
    Bar(
        "startup60-overshoot",
        "startup60",
        f"60s start-ups: no scale-up while pods load, peak <= {DIURNAL_COST_RATIO}x oracle",
        _no_overshoot,
    ),
    Bar(
        "startup60-recovery",
        "startup60",
        f"60s start-ups: attainment back within {RECOVERY_INTERVALS} intervals + the start-up",
        _recovery_after_startup,
    ),
    Bar("startup60-steady", "startup60", "60s start-ups, steady 4x after settling: zero replica changes", _steady),
    Bar("diurnal-attainment", "diurnal", "diurnal: SLO attainment >= 95%", _attainment),
    Bar("diurnal-cost", "diurnal", f"diurnal: replica-minutes <= {DIURNAL_COST_RATIO}x oracle", _cost),
)


TIGHT_RECOVERY_INTERVALS = 2
TIGHT_ATTAINMENT = 0.99
TIGHT_COST_RATIO = 1.15
TIGHT_BURSTS_COST_RATIO = 1.8
TIGHT_INTERACTIVE_ATTAINMENT = 0.99
INTERACTIVE_CLASS = "interactive"


def _tight_recovery(outcome: run.Outcome) -> Verdict:
    intervals = outcome.recovery_intervals
    if intervals is None:
        return Verdict("n/a", False)
    limit = TIGHT_RECOVERY_INTERVALS + (startup_allowance(outcome) if outcome.trace == "startup60" else 0)
    return Verdict(f"{intervals} intervals (<= {limit})", intervals <= limit)


def _cost_at_most(limit: float) -> Callable[[run.Outcome], Verdict]:
    def judge(outcome: run.Outcome) -> Verdict:
        ratio = outcome.cost_ratio
        return Verdict(f"{ratio:.2f}x oracle (<= {limit:g}x)", ratio <= limit)

    return judge


def _tight_attainment(outcome: run.Outcome) -> Verdict:
    return Verdict(f"{outcome.attainment:.2%}", outcome.attainment >= TIGHT_ATTAINMENT)


def _interactive(outcome: run.Outcome) -> Verdict:
    value = outcome.attainment_by_class.get(INTERACTIVE_CLASS)
    if value is None:
        return Verdict("n/a", False)
    return Verdict(f"{value:.2%}", value >= TIGHT_INTERACTIVE_ATTAINMENT)


TIGHT_BARS: tuple[Bar, ...] = (
    Bar("tight-step-recovery", "step", f"#18 step: recovery <= {TIGHT_RECOVERY_INTERVALS} intervals", _tight_recovery),
    Bar("tight-step-cost", "step", f"#18 step: replica-minutes <= {TIGHT_COST_RATIO}x oracle",
        _cost_at_most(TIGHT_COST_RATIO)),
    Bar("tight-startup60-recovery", "startup60",
        f"#18 60s start-ups: recovery <= {TIGHT_RECOVERY_INTERVALS} intervals + the start-up", _tight_recovery),
    Bar("tight-diurnal-attainment", "diurnal", f"#18 diurnal: SLO attainment >= {TIGHT_ATTAINMENT:.0%}",
        _tight_attainment),
    Bar("tight-diurnal-cost", "diurnal", f"#18 diurnal: replica-minutes <= {TIGHT_COST_RATIO}x oracle",
        _cost_at_most(TIGHT_COST_RATIO)),
    Bar("tight-bursts-cost", "bursts", f"#18 bursts: replica-minutes <= {TIGHT_BURSTS_COST_RATIO}x oracle",
        _cost_at_most(TIGHT_BURSTS_COST_RATIO)),
    Bar("tight-class-mix-interactive", "class-mix",
        f"#18 class-mix: interactive attainment >= {TIGHT_INTERACTIVE_ATTAINMENT:.0%}", _interactive),
)  # fmt: skip


def bars_for(trace: str, *, tight: bool = False) -> tuple[Bar, ...]:
    """The bars judged on `trace`: issue #8's and #14's, or with `tight` also issue #18's."""
    chosen = (*BARS, *TIGHT_BARS) if tight else BARS
    return tuple(bar for bar in chosen if bar.trace == trace)
