"""Baseline for comparison: a plain queue-depth autoscaler, as a Kubernetes HPA (or KEDA) would run it.

`desired = ceil(current * waiting_per_pod / target)` on the runtime's waiting-requests gauge (vLLM
production-stack's default KEDA trigger, threshold 5), with the HPA's 10% tolerance, its default
behaviour (scale up at once by up to max(100%, 4 pods) per step; scale down to the highest
recommendation of the last 300 s, in one go) and no batch tuning or shedding. Same interface as
`decide.decide`, so the simulator runs both in the same trace. Pure: `now` is a parameter, no I/O.
"""

from __future__ import annotations

import math

from fleetlm_operator.policy import decide as decide_mod
from fleetlm_operator.policy import slo
from fleetlm_operator.policy import spec as spec_mod
from fleetlm_operator.policy import state as state_mod
from fleetlm_operator.policy import window as window_mod

TARGET_WAITING_PER_POD = 5.0
TOLERANCE = 0.1
SCALE_DOWN_STABILIZATION_S = 300.0
SCALE_UP_MAX_FACTOR = 2.0  # HPA default scaleUp policies: 100% or 4 pods per 15 s, whichever is more
SCALE_UP_MAX_PODS = 4


def decide(
    policy_input: spec_mod.PolicyInput,
    window: window_mod.ObservedWindow,
    state: state_mod.TunerState,
    *,
    now: float,
    target_waiting_per_pod: float = TARGET_WAITING_PER_POD,
) -> decide_mod.Decision:
    spec = policy_input.spec
    current = policy_input.current_replicas
    low, high = max(spec.min_replicas, 1), spec.max_replicas
    recorded_before = state.recommendations
    if state.history_start_s is None:
        # Like the HPA controller, which seeds its history with the current count when it starts.
        recorded_before = (state_mod.Recommendation(at_s=now, replicas=current),)
    history = tuple(r for r in recorded_before if r.at_s > now - SCALE_DOWN_STABILIZATION_S)
    waiting = window.waiting_per_pod
    rec: int | None
    if current == 0:
        replicas, rec, why = 0, None, "hpa: 0 replicas (parked)"
    elif waiting is None:
        replicas, rec, why = current, None, f"hpa: hold {current}, metric unavailable ({window.reason})"
    else:
        ratio = waiting / target_waiting_per_pod
        rec = current if abs(ratio - 1.0) <= TOLERANCE else math.ceil(current * ratio - 1e-9)
        rec = min(high, max(low, rec))
        if rec > current:
            limit = max(math.ceil(current * SCALE_UP_MAX_FACTOR), current + SCALE_UP_MAX_PODS)
            replicas = min(rec, limit)
        else:
            replicas = min(current, max([*(r.replicas for r in history), rec]))
        why = (
            f"hpa: {current} -> {replicas}: {waiting:.2f} waiting/pod vs target {target_waiting_per_pod:g} "
            f"(ratio {ratio:.2f}, recommendation {rec})"
        )
    recorded = history if rec is None else (*history, state_mod.Recommendation(at_s=now, replicas=rec))
    initial = decide_mod.current_limits(spec, state_mod.TunerState())
    new_state = state_mod.TunerState(
        recommendations=recorded[-state_mod.MAX_RECOMMENDATIONS :],
        history_start_s=state.history_start_s if state.history_start_s is not None else now,
        last_replicas=replicas,
        last_scale_s=now if replicas != current else state.last_scale_s,
        updated_s=now,
    )
    return decide_mod.Decision(
        replicas=replicas,
        max_batch_size=initial.max_batch_size,
        max_batch_tokens=initial.max_batch_tokens,
        shed_classes=(),
        reasons=(why,),
        state=new_state,
        metrics_available=window.complete,
        metrics_reason=window.reason,
        slo_met=slo.assess(window, spec=spec).met,
        recommended_replicas=rec,
    )
