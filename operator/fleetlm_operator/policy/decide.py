"""The SLO tuner's decision: (spec + fleet, observed window, tuner state, now) -> Decision, with reasons.

First the engine's cost curve takes this window's point (`costcurve`); once the fit is trusted, its
half-cost batch replaces the spec's prior in every rule below. Then three rules in order: batch limits
(`batching`), then replicas sized for those limits (`replicas`), then QoS shedding given the replica
count (`shedding`). The decision carries the next `TunerState` for the handler to persist, and every
reason as data so status and Events can explain it. This function is the whole policy: it reads no clock
(`now` is wall-clock epoch seconds from the caller), no environment, does no I/O, and never imports
kopf, a Kubernetes client, aiohttp, or collect/act/handlers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from fleetlm_operator.policy import batching, costcurve, queuebound, replicas, shedding, slo, startup
from fleetlm_operator.policy import spec as spec_mod
from fleetlm_operator.policy import state as state_mod
from fleetlm_operator.policy import window as window_mod


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    replicas: int
    max_batch_size: int
    max_batch_tokens: int
    shed_classes: tuple[str, ...]
    reasons: tuple[str, ...]
    state: state_mod.TunerState  # persist this; pass it back next tick
    metrics_available: bool  # -> condition MetricsAvailable
    metrics_reason: str  # "" when complete
    slo_met: bool | None  # -> condition SLOMet; None: too little traffic to judge
    recommended_replicas: int | None  # what this tick's data asked for, before stabilization
    startup_s: float | None = None  # the pods' learnt start-up time (None: no pod seen starting yet)
    loading: startup.Loading | None = None  # the not-ready pods as this tick counted them
    # Per class, the per-replica queue limit to push as the runtime's qos.classes[].queueLimit (`queuebound`);
    # a class absent keeps the spec's.
    queue_limits: Mapping[str, int] = dataclasses.field(default_factory=dict)


def current_limits(spec: spec_mod.PolicySpec, state: state_mod.TunerState) -> batching.BatchLimits:
    """The batch limits in force: the tuner's last values, else the spec's initial ones, within bounds."""
    initial = batching.initial_limits(spec.batching)
    return batching.clamp(
        batching.BatchLimits(
            max_batch_size=state.max_batch_size if state.max_batch_size is not None else initial.max_batch_size,
            max_batch_tokens=state.max_batch_tokens if state.max_batch_tokens is not None else initial.max_batch_tokens,
        ),
        spec.batching,
    )


def decide(
    policy_input: spec_mod.PolicyInput,
    window: window_mod.ObservedWindow,
    state: state_mod.TunerState,
    *,
    now: float,
) -> Decision:
    # The engine's own cost line, once trusted, stands in for the spec's assumed half-cost batch.
    prior = policy_input.spec.tuning
    cost = costcurve.observe(state.cost, window, tuning=prior, now=now)
    fitted = costcurve.fit(cost, tuning=prior)
    if fitted is not None:
        calibrated = dataclasses.replace(policy_input.spec, tuning=costcurve.calibrated(prior, fitted))
        policy_input = dataclasses.replace(policy_input, spec=calibrated)
    spec = policy_input.spec
    tuning = spec.tuning
    held = current_limits(spec, state)
    learnt = startup.observe(state.startup, policy_input.started, tuning=tuning)
    loading = startup.classify(policy_input, learnt, tuning=tuning)
    # The fleet is settling while pods have served less than two intervals (as the replica rule). Pods still
    # loading do not count: they serve nothing, so the window's misses are of the fleet as it is.
    just_ready = any(p.ready_for_s is not None and p.ready_for_s < 2 * spec.interval_s for p in policy_input.started)
    settling = just_ready or window.num_pods_with_delta < window.num_pods_sampled
    assessment = slo.assess(window, spec=spec, ignore_classes=state.shed_classes)
    demand = replicas.estimate_demand(window, tuning=tuning, shed_classes=state.shed_classes)
    demand_up = replicas.estimate_demand(window, tuning=tuning, shed_classes=state.shed_classes, beyond_swing=True)

    def replicas_for_size(max_batch_size: int) -> replicas.ReplicaDecision:
        return replicas.decide_replicas(
            policy_input,
            window,
            demand=demand,
            assessment=assessment,
            max_batch_size=max_batch_size,
            recommendations=state.recommendations,
            history_start_s=state.history_start_s,
            shedding=bool(state.shed_classes),
            now=now,
            loading=loading,
            surge=state.surge,
            demand_up=demand_up,
        )

    # The replica rule at the limits in force first: where the pods it adds bring the mean TPOT back under
    # target, the batch rule leaves a TPOT miss to them. The replica decision stands where the batch size
    # stays; a new size re-runs it on that size.
    rep_at_held = replicas_for_size(held.max_batch_size)
    batch = batching.decide_batch_limits(
        spec,
        window,
        current=held,
        changed_s=state.batch_changed_s,
        direction=state.batch_direction,
        now=now,
        settling=settling,
        adding_replicas=batching.pods_relieve_tpot(
            spec, window, replicas_now=policy_input.current_replicas, replicas_next=rep_at_held.replicas
        ),
    )
    limits = batch.limits
    rep = rep_at_held if limits.max_batch_size == held.max_batch_size else replicas_for_size(limits.max_batch_size)
    bound = queuebound.decide_queue_bound(spec, window, max_batch_size=limits.max_batch_size, held=state.queue_limits)

    load_at_max_with_shed: float | None = None
    if state.shed_classes:
        with_shed = replicas.estimate_demand(window, tuning=tuning, shed_classes=state.shed_classes, include_shed=True)
        if with_shed is not None:
            load_at_max_with_shed = replicas.projected_occupancy(
                with_shed, replicas=spec.max_replicas, max_batch_size=limits.max_batch_size, tuning=tuning
            )
    shed = shedding.decide_shedding(
        spec,
        window,
        replicas=rep.replicas,
        ready_replicas=policy_input.ready_replicas,
        wanted=rep.wanted,
        load_at_max_with_shed=load_at_max_with_shed,
        assessment=assessment,
        shed=state.shed_classes,
        changed_s=state.shed_changed_s,
        clear_since_s=state.unshed_clear_since_s,
        now=now,
    )

    reasons: list[str] = []
    if not window.complete:
        reasons.append(f"metrics incomplete: {window.reason}")
    reasons.extend(rep.reasons)
    reasons.extend(batch.reasons)
    reasons.extend(bound.reasons)
    reasons.extend(shed.reasons)
    reasons.append(
        fitted.describe()
        if fitted is not None
        else f"engine: half-cost batch {tuning.batch_half_cost_seqs:g} seqs (spec prior; too few varied "
        f"windows to fit the TPOT-vs-batch line yet)"
    )
    batch_moved = limits != held
    scaled = rep.replicas != policy_input.current_replicas
    new_state = state_mod.TunerState(
        recommendations=rep.recommendations,
        history_start_s=rep.history_start_s,
        max_batch_size=limits.max_batch_size,
        max_batch_tokens=limits.max_batch_tokens,
        batch_changed_s=now if batch_moved else state.batch_changed_s,
        batch_direction=batch.direction if batch_moved else state.batch_direction,
        shed_classes=shed.shed_classes,
        shed_changed_s=shed.changed_s,
        unshed_clear_since_s=shed.clear_since_s,
        last_replicas=rep.replicas,
        last_scale_s=now if scaled else state.last_scale_s,
        surge=rep.surge,
        updated_s=now,
        cost=cost,
        startup=learnt,
        queue_limits=bound.limits,
    )
    if spec.advise:
        # Nothing of this decision will be applied: carry forward what is in force (the limits, the shed
        # classes and when they moved, the last scale) so the next tick decides from the fleet as it
        # really is, and keep what was learnt from the data (recommendations, cost curve, start-up).
        reasons.append("advisory mode: decision recorded, not applied")
        new_state = dataclasses.replace(
            new_state,
            max_batch_size=state.max_batch_size,
            max_batch_tokens=state.max_batch_tokens,
            batch_changed_s=state.batch_changed_s,
            batch_direction=state.batch_direction,
            shed_classes=state.shed_classes,
            shed_changed_s=state.shed_changed_s,
            # How long unshedding has been justified is data about the classes in force: keep counting.
            unshed_clear_since_s=shed.clear_since_s
            if shed.shed_classes == state.shed_classes
            else state.unshed_clear_since_s,
            last_replicas=state.last_replicas,
            last_scale_s=state.last_scale_s,
            surge=state.surge,
            queue_limits=state.queue_limits,
        )
    return Decision(
        replicas=rep.replicas,
        max_batch_size=limits.max_batch_size,
        max_batch_tokens=limits.max_batch_tokens,
        shed_classes=shed.shed_classes,
        reasons=tuple(reasons),
        state=new_state,
        metrics_available=window.complete,
        metrics_reason=window.reason,
        slo_met=assessment.met,
        recommended_replicas=rep.recommendation,
        startup_s=learnt.mean_s,
        loading=loading,
        queue_limits=bound.limits,
    )
