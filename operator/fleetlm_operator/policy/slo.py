"""SLO assessment: did an observed window meet the service's latency targets, and with room to spare?

Per class where a class saw enough requests to judge, else the fleet as a whole. Decides nothing about
replicas or batches; the policy reads the verdict. Pure: no clock, no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

from fleetlm_operator.policy import spec as spec_mod
from fleetlm_operator.policy.window import ObservedWindow


@dataclasses.dataclass(frozen=True, slots=True)
class SLOAssessment:
    """Whether the window met the SLO, judged only where enough requests were seen."""

    met: bool | None  # None: too few requests anywhere to judge
    missed_classes: tuple[str, ...]  # classes (or "*" for the fleet as a whole) below target
    headroom: bool  # met with room to spare (or too little traffic to matter): scale-down may proceed
    detail: str


def assess(  # noqa: PLR0912 - four checks in turn (per class, fleet, per-class and fleet headroom) share one list of notes
    window: ObservedWindow, *, spec: spec_mod.PolicySpec, ignore_classes: Collection[str] = ()
) -> SLOAssessment:
    """Judge the window against the SLO: per class where a class saw enough requests, else the fleet."""
    tuning = spec.tuning
    target = spec.slo.target_attainment
    pct = f"p{spec.slo.percentile:g}"
    enough = tuning.min_requests_for_latency
    missed: list[str] = []
    notes: list[str] = []
    judged = False
    for name, cls in sorted(window.classes.items()):
        if name in ignore_classes or cls.num_requests < enough:
            continue
        judged = True
        for metric, value in (("TTFT", cls.ttft_attainment), ("TPOT", cls.tpot_attainment)):
            if value is not None and value < target:
                missed.append(name)
                notes.append(f"{name}: {metric} attainment {value:.1%} < {target:.0%}")
                break
    fleet_requests = sum(c.num_requests for n, c in window.classes.items() if n not in ignore_classes)
    if not judged and fleet_requests >= enough and not ignore_classes:
        # Classes too thin to judge one by one: judge the fleet against the service's targets.
        judged = True
        for metric, value, target_s in (
            ("TTFT", window.ttft_quantile_s, spec.slo.ttft_s),
            ("TPOT", window.tpot_quantile_s, spec.slo.tpot_s),
        ):
            if value is not None and target_s is not None and value > target_s:
                missed.append("*")
                notes.append(f"fleet {metric} {pct} {value:.3f}s > {target_s:.3f}s")
                break
    headroom = not missed
    # Clear headroom: attainment with at most a share of the misses the SLO allows, per judged class.
    floor = 1.0 - (1.0 - target) * tuning.headroom_miss_share
    if headroom:
        for name, cls in sorted(window.classes.items()):
            if name in ignore_classes or cls.num_requests < enough or cls.attainment is None:
                continue
            if cls.attainment < floor:
                headroom = False
                notes.append(f"{name}: attainment {cls.attainment:.1%} < headroom {floor:.1%}")
                break
    if headroom and fleet_requests >= enough:
        # TPOT by its exact mean: its quantile is read off buckets as wide as the target itself.
        for metric, value, target_s, factor in (
            (f"TTFT {pct}", window.ttft_quantile_s, spec.slo.ttft_s, tuning.scale_down_ttft_headroom),
            ("TPOT mean", window.tpot_mean_s, spec.slo.tpot_s, tuning.scale_down_tpot_headroom),
        ):
            if value is not None and target_s is not None and value > factor * target_s:
                headroom = False
                notes.append(f"{metric} {value:.3f}s above {factor:g} x target {target_s:.3f}s")
    if not judged:
        detail = f"{fleet_requests} requests, too few to judge latency"
    elif missed:
        detail = "; ".join(notes)
    else:
        parts = [f"TTFT {pct} {_s(window.ttft_quantile_s)}", f"TPOT {pct} {_s(window.tpot_quantile_s)}"]
        if window.slo_attainment is not None:
            parts.append(f"attainment {window.slo_attainment:.1%}")
        detail = ", ".join(parts) + ("" if headroom else " (" + "; ".join(notes) + ")")
    return SLOAssessment(
        met=None if not judged else not missed,
        missed_classes=tuple(dict.fromkeys(missed)),
        headroom=headroom,
        detail=detail,
    )


def _s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}s"
