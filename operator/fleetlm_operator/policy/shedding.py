"""Which QoS classes to refuse (HTTP 429): the sheddable ones, only at max replicas, and back with hysteresis.

Shed when the fleet is at max replicas (all of them ready), the demand asks for more than max, and the
SLO is still missed: then the least urgent sheddable class not yet shed goes, one class per cooldown.
Take classes back, the last shed first, once the whole demand (refused arrivals included) fits
comfortably under max replicas with the SLO met, continuously for a hold time on complete data. Never
shed below max replicas and never shed a class the spec does not mark sheddable. Pure: `now` is a
parameter; no clock, no I/O.
"""

from __future__ import annotations

import dataclasses

from fleetlm_operator.policy import slo
from fleetlm_operator.policy import spec as spec_mod
from fleetlm_operator.policy import window as window_mod


@dataclasses.dataclass(frozen=True, slots=True)
class ShedDecision:
    shed_classes: tuple[str, ...]  # in the order they were shed
    changed_s: float | None
    clear_since_s: float | None  # since when taking a class back has been justified
    reasons: tuple[str, ...]


def decide_shedding(  # noqa: PLR0911, PLR0912 - a ladder of rules in priority order, each returning with its reason
    spec: spec_mod.PolicySpec,
    window: window_mod.ObservedWindow,
    *,
    replicas: int,
    ready_replicas: int,
    wanted: int | None,
    load_at_max_with_shed: float | None,
    assessment: slo.SLOAssessment,
    shed: tuple[str, ...],
    changed_s: float | None,
    clear_since_s: float | None,
    now: float,
) -> ShedDecision:
    """`replicas`: what this tick decided; `ready_replicas`: pods serving now (at max only counts when all
    of max are up: pods still starting may yet carry the load); `wanted`: what the demand asks for, unclamped;
    `load_at_max_with_shed`: demand including refused classes over the batch slots of max replicas."""
    tuning = spec.tuning
    order = spec.shed_order()
    kept = tuple(name for name in shed if name in order)
    reasons: list[str] = []
    if kept != shed:
        dropped = sorted(set(shed) - set(kept))
        reasons.append(f"shedding: take back {', '.join(dropped)}, no longer sheddable in the spec")
        changed_s = now
    if not order:
        return ShedDecision((), changed_s, None, tuple(reasons))

    cooldown_s = tuning.shed_cooldown_intervals * spec.interval_s
    cooling_left_s = 0.0 if changed_s is None else max(0.0, cooldown_s - (now - changed_s))
    cooling = cooling_left_s > 0
    at_max = replicas >= spec.max_replicas and ready_replicas >= spec.max_replicas
    overloaded = wanted is not None and wanted > spec.max_replicas
    if at_max and overloaded and assessment.met is False:
        remaining = [name for name in order if name not in kept]
        why = f"at max {spec.max_replicas} replicas, demand asks for {wanted}, SLO missed ({assessment.detail})"
        if not remaining:
            reasons.append(f"shedding: all sheddable classes shed ({', '.join(kept)}); {why}")
            return ShedDecision(kept, changed_s, None, tuple(reasons))
        if cooling:
            reasons.append(f"shedding: hold {_names(kept)}, {cooling_left_s:.0f}s of cooldown left; {why}")
            return ShedDecision(kept, changed_s, None, tuple(reasons))
        shed_now = (*kept, remaining[0])
        reasons.append(f"shedding: shed {remaining[0]} (now {_names(shed_now)}): {why}")
        return ShedDecision(shed_now, now, None, tuple(reasons))

    if not kept:
        return ShedDecision((), changed_s, None, tuple(reasons))

    hold_s = tuning.unshed_hold_s if tuning.unshed_hold_s is not None else spec.scale_down_stabilization_s
    blockers: list[str] = []
    if not window.complete:
        blockers.append(f"incomplete metrics ({window.reason})")
    if assessment.met is False:
        blockers.append(f"SLO missed ({assessment.detail})")
    if load_at_max_with_shed is None:
        blockers.append("demand of the shed classes unknown")
    elif load_at_max_with_shed > tuning.unshed_occupancy:
        blockers.append(
            f"with {_names(kept)} back, max replicas would run {load_at_max_with_shed:.0%} full > "
            f"{tuning.unshed_occupancy:.0%}"
        )
    if cooling:
        blockers.append("shed moments ago")
    if blockers:
        reasons.append(f"shedding: keep {_names(kept)}: {', '.join(blockers)}")
        return ShedDecision(kept, changed_s, None, tuple(reasons))
    since_s = now if clear_since_s is None else clear_since_s
    if now - since_s < hold_s:
        reasons.append(
            f"shedding: keep {_names(kept)}, demand with them fits ({load_at_max_with_shed:.0%} of max) for "
            f"{now - since_s:.0f}s of {hold_s:.0f}s"
        )
        return ShedDecision(kept, changed_s, since_s, tuple(reasons))
    back = kept[-1]
    reasons.append(
        f"shedding: take back {back}: demand with it {load_at_max_with_shed:.0%} of max replicas "
        f"<= {tuning.unshed_occupancy:.0%} for {now - since_s:.0f}s, SLO met"
    )
    return ShedDecision(kept[:-1], now, None, tuple(reasons))


def _names(names: tuple[str, ...]) -> str:
    return ", ".join(names) if names else "none"
