"""Between the LLMService API and the tuning policy: spec -> PolicySpec, window and decision -> status.

Pure: pydantic models and policy values in, the API's status models out (`status_models.status_json` turns
them into what is written); `now` is a parameter. The policy never sees the CRD models, and the
handlers never compute status fields themselves.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

import pydantic

from fleetlm_operator.api import fields, names, spec_models, status_models
from fleetlm_operator.policy import decide as decide_mod
from fleetlm_operator.policy import spec as policy_spec
from fleetlm_operator.policy import window as window_mod
from fleetlm_operator.status import conditions


def _seconds(value: str | None) -> float | None:
    return None if value is None else fields.parse_duration_s(value)


def policy_spec_of(spec: spec_models.LLMServiceSpec) -> policy_spec.PolicySpec:
    slo = spec.slo
    batching = spec.batching
    classes = tuple(
        policy_spec.ClassSpec(
            name=qos_class.name,
            priority=qos_class.priority,
            sheddable=qos_class.sheddable,
            ttft_s=_seconds(qos_class.slo.ttft) if qos_class.slo is not None else None,
            tpot_s=_seconds(qos_class.slo.tpot) if qos_class.slo is not None else None,
            queue_limit=qos_class.queue_limit,
        )
        for qos_class in spec.qos.classes
    )
    return policy_spec.PolicySpec(
        slo=policy_spec.SLOTargets(
            ttft_s=_seconds(slo.ttft) if slo is not None else None,
            tpot_s=_seconds(slo.tpot) if slo is not None else None,
            percentile=slo.percentile if slo is not None else 95.0,
        ),
        # The tuner never scales to zero: only the idle handler does (after spec.replicas.idleTimeout, with
        # the router to hold requests), so with min 0 the tuner's floor is one replica.
        min_replicas=max(spec.replicas.min, 1),
        max_replicas=spec.replicas.max,
        batching=policy_spec.BatchingBounds(
            max_batch_size=batching.max_batch_size,
            max_batch_tokens=batching.max_batch_tokens,
            min_max_batch_size=batching.max_batch_size_range.min,
            max_max_batch_size=batching.max_batch_size_range.max,
            min_max_batch_tokens=batching.max_batch_tokens_range.min,
            max_max_batch_tokens=batching.max_batch_tokens_range.max,
            autotune=batching.autotune,
        ),
        classes=classes,
        interval_s=fields.parse_duration_s(spec.autoscaling.interval),
        scale_up_stabilization_s=fields.parse_duration_s(spec.autoscaling.scale_up_stabilization),
        scale_down_stabilization_s=fields.parse_duration_s(spec.autoscaling.scale_down_stabilization),
        autoscaling=spec.autoscaling.enabled,
        advise=spec.autoscaling.mode == "advise",
    )


def _stamp(now: datetime.datetime) -> datetime.datetime:
    """`now` in UTC, to the second (as the API server writes its own timestamps)."""
    return now.astimezone(datetime.UTC).replace(microsecond=0)


def _rounded(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


def observed_status(
    window: window_mod.ObservedWindow, *, percentile: float, now: datetime.datetime
) -> status_models.ObservedMetrics:
    """status.observed: what the window saw; unknown figures stay absent (never written as zero)."""
    return status_models.ObservedMetrics(
        percentile=percentile,
        ttft_seconds=_rounded(window.ttft_quantile_s),
        tpot_seconds=_rounded(window.tpot_quantile_s),
        request_rate=_rounded(window.finished_per_s),
        queue_depth=_rounded(window.num_waiting),
        gpu_utilization=_rounded(window.gpu_utilization),
        slo_attainment=_rounded(window.slo_attainment),
        window_seconds=round(window.window_s, 3) if window.window_s > 0 else None,
        collected_at=_stamp(now),
        num_pods_sampled=window.num_pods_sampled,
        num_pods_expected=window.num_pods_expected,
    )


def _epoch_s(value: Any) -> float | None:
    """An API timestamp (RFC 3339, as the API server writes it) in unix seconds; None when absent or unreadable."""
    if not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.timestamp()


def pod_startups(
    pods: list[dict[str, Any]], *, now_s: float
) -> tuple[tuple[float, ...], tuple[policy_spec.PodStartup, ...]]:
    """(ages of the pods not ready yet, start-ups of the ready ones) from the pods as the API returns them.

    A ready pod's start-up is creation -> its Ready condition's last transition: scheduling, image pull,
    weight load and warm-up together, which is what a scale-up waits for. Pods whose containers restarted
    are left out (a crash loop is not a start-up time, and the transition is then the latest recovery), and
    so are pods being deleted. Ready ones come oldest first, the order the learning expects.
    """
    loading: list[float] = []
    started: list[tuple[float, policy_spec.PodStartup]] = []
    for pod in pods:
        metadata = pod.get("metadata", {}) or {}
        status = pod.get("status", {}) or {}
        created_s = _epoch_s(metadata.get("creationTimestamp"))
        if metadata.get("deletionTimestamp") or created_s is None:
            continue
        ready = conditions.find(status.get("conditions", []) or [], "Ready")
        if not ready or ready.get("status") != "True":
            loading.append(max(0.0, now_s - created_s))
            continue
        ready_s = _epoch_s(ready.get("lastTransitionTime"))
        restarted = any(int(c.get("restartCount", 0) or 0) > 0 for c in status.get("containerStatuses", []) or [])
        if ready_s is None or restarted or ready_s < created_s:
            continue
        started.append(
            (ready_s, policy_spec.PodStartup(str(metadata.get("name", "")), ready_s - created_s, now_s - ready_s))
        )
    started.sort(key=lambda item: item[0])
    return tuple(sorted(loading)), tuple(pod for _, pod in started)


def startup_status(decision: decide_mod.Decision) -> status_models.StartupStatus:
    """status.startup: the learnt start-up time and the pods loading now; unknown figures stay absent."""
    learnt = decision.state.startup
    loading = decision.loading
    return status_models.StartupStatus(
        observed_seconds=_rounded(learnt.mean_s, 3),
        last_seconds=_rounded(learnt.last_s, 3),
        pods_observed=learnt.count,
        loading_replicas=loading.on_the_way if loading is not None else None,
        stuck_replicas=loading.stuck if loading is not None else None,
    )


def decision_conditions(decision: decide_mod.Decision) -> list[conditions.Condition]:
    available = conditions.Condition(
        names.ConditionType.METRICS_AVAILABLE,
        "True" if decision.metrics_available else "False",
        "Collected" if decision.metrics_available else "Incomplete",
        "every ready pod reported a full window" if decision.metrics_available else decision.metrics_reason,
    )
    if decision.slo_met is None:
        slo = conditions.Condition(
            names.ConditionType.SLO_MET,
            "Unknown",
            "NotEnoughTraffic",
            "too few requests in the window to judge the SLO",
        )
    elif decision.slo_met:
        slo = conditions.Condition(
            names.ConditionType.SLO_MET, "True", "WithinTarget", "latency at the SLO percentile is within target"
        )
    else:
        slo = conditions.Condition(
            names.ConditionType.SLO_MET,
            "False",
            "TargetMissed",
            "; ".join(r for r in decision.reasons if "SLO" in r or "attain" in r)[:1000]
            or "latency at the SLO percentile is over target",
        )
    return [available, slo]


def decision_actions(
    decision: decide_mod.Decision,
    *,
    current_replicas: int,
    current_limits: tuple[int, int],
    current_shed: tuple[str, ...],
) -> list[str]:
    """What changed, as short action names (also the label of the operator's decisions metric)."""
    actions = []
    if decision.replicas > current_replicas:
        actions.append("scale_up")
    elif decision.replicas < current_replicas:
        actions.append("scale_down")
    size, tokens = current_limits
    if (decision.max_batch_size, decision.max_batch_tokens) != (size, tokens):
        grew = decision.max_batch_size > size or decision.max_batch_tokens > tokens
        actions.append("batch_grow" if grew else "batch_shrink")
    if set(decision.shed_classes) - set(current_shed):
        actions.append("shed")
    if set(current_shed) - set(decision.shed_classes):
        actions.append("unshed")
    return actions


def decision_record(
    decision: decide_mod.Decision, *, actions: Sequence[str], now: datetime.datetime, advise: bool = False
) -> status_models.DecisionRecord:
    """One status.decisions entry; in advisory mode the action reads `advise:<actions>` (nothing was applied)."""
    if not actions:
        raise ValueError("a decision that changes nothing is not recorded")
    action = ",".join(actions)
    return status_models.DecisionRecord(
        time=_stamp(now),
        action=f"{status_models.ADVISE_PREFIX}{action}" if advise else action,
        reason="; ".join(decision.reasons)[:1024] or "no change needed",
    )


def bounded_history(
    stored: Sequence[Mapping[str, Any]], record: status_models.DecisionRecord
) -> list[status_models.DecisionRecord]:
    """status.decisions with `record` appended, the oldest dropped beyond `MAX_DECISIONS`.

    `stored` is the list as read from the API server; an entry an older operator wrote that this API
    version no longer accepts is dropped rather than written back (the API server would refuse the patch).
    """
    history = []
    for entry in stored:
        try:
            history.append(status_models.DecisionRecord.model_validate(entry))
        except pydantic.ValidationError:
            continue
    return [*history, record][-status_models.MAX_DECISIONS :]
