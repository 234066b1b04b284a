"""The SLO tuner, a kopf timer per LLMService: read -> plan -> execute.

Every `spec.autoscaling.interval`: read the ready pods' metrics (direct scrape, or Prometheus), turn
the last two readings into a window, ask the pure policy for a decision, then act on it: write the
desired replicas where /scale reads them (the reconcile handler scales the Deployment), rewrite the
ConfigMap and push batch limits, shed classes and the spec's QoS classes (with their SLO targets) to
every ready pod without restarting it, and record status (observed metrics, tuning, the last decisions,
SLOMet and MetricsAvailable), an Event and the
operator's metrics. The tuner's state lives in an annotation, so it survives operator restarts.
With `spec.autoscaling.mode: advise` it decides and records (status.decisions, Events, metrics) the
same way but applies nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import time
from collections.abc import Mapping
from typing import Any

import kopf

from fleetlm_operator import bridge, metrics
from fleetlm_operator.act import push
from fleetlm_operator.api import models, names, status_models
from fleetlm_operator.builders import configmap, meta, model_cache, secret
from fleetlm_operator.collect import prometheus, scrape
from fleetlm_operator.handlers import context, reconcile
from fleetlm_operator.policy import decide as decide_mod
from fleetlm_operator.policy import spec as policy_spec
from fleetlm_operator.policy import state as state_mod
from fleetlm_operator.policy import window as window_mod
from fleetlm_operator.status import conditions

TICK_S = 5.0  # how often the timer wakes; the tuner acts every spec.autoscaling.interval
MEMO_KEY = "fleetlm_tuner"


@dataclasses.dataclass(slots=True)
class TunerMemory:
    """Per-object, in-process only: losing it on restart costs one window of baseline, nothing else."""

    last_tick_s: float = 0.0
    previous: dict[str, window_mod.PodSample] = dataclasses.field(default_factory=dict)
    pushed: dict[str, str] = dataclasses.field(default_factory=dict)  # pod -> digest of the live config it took


def _ready_endpoints(pods: list[dict[str, Any]]) -> dict[str, str]:
    """pod name -> http://<pod IP>:<http port>, for pods that are Ready and have an IP."""
    endpoints = {}
    for pod in pods:
        status = pod.get("status", {}) or {}
        if pod.get("metadata", {}).get("deletionTimestamp") or not status.get("podIP"):
            continue
        ready = conditions.find(status.get("conditions", []) or [], "Ready")
        if not ready or ready.get("status") != "True":
            continue
        port = meta.HTTP_PORT
        for container in pod.get("spec", {}).get("containers", []):
            for declared in container.get("ports", []) or []:
                if declared.get("name") == meta.HTTP_PORT_NAME:
                    port = int(declared["containerPort"])
        endpoints[pod["metadata"]["name"]] = f"http://{status['podIP']}:{port}"
    return endpoints


def _load_state(body: kopf.Body, logger: kopf.Logger) -> state_mod.TunerState:
    raw = body.get("metadata", {}).get("annotations", {}).get(names.ANNOTATION_TUNER_STATE)
    if not raw:
        return state_mod.TunerState()
    try:
        return state_mod.TunerState.from_json(raw)
    except ValueError as error:
        logger.warning("ignoring unreadable tuner state (%s); starting afresh", error)
        return state_mod.TunerState()


async def _collect(
    svc: models.LLMService, endpoints: dict[str, str], *, now_s: float
) -> tuple[dict[str, window_mod.PodSample], dict[str, str]]:
    if svc.spec.autoscaling.metrics_source == "prometheus":
        result = await prometheus.query_pods(
            str(svc.spec.autoscaling.prometheus_url), namespace=svc.namespace, pods=sorted(endpoints), at_s=now_s
        )
        return result.samples, result.errors
    scraped = await scrape.scrape_pods(endpoints)
    return scraped.samples, scraped.errors


@dataclasses.dataclass(frozen=True, slots=True)
class Observation:
    """What one tick read from the cluster and the pods, in the policy's types."""

    endpoints: dict[str, str]  # the ready pods: name -> base URL
    window: window_mod.ObservedWindow
    policy_input: policy_spec.PolicyInput
    state: state_mod.TunerState
    tuning_now: status_models.TuningStatus  # the limits the pods run with as the tick starts


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """Everything one tick will write, decided before anything is written (`plan` is pure)."""

    decision: decide_mod.Decision
    actions: list[str]  # what the decision changes (`bridge.decision_actions`); empty: nothing to record
    mode: str  # "act" or "advise", as the decisions metric labels it
    # Rewrite the ConfigMap with these limits (act mode, a tuning action); None: leave it.
    config_tuning: status_models.TuningStatus | None
    tuning_event: tuple[str, str] | None  # (reason, message): Advised, or Tuned
    live_tuning: status_models.TuningStatus  # what the ready pods should run with (pushed where they differ)
    scale_to: int | None  # replicas to write where /scale reads them (act mode, a scale action)
    scale_event: tuple[str, str] | None  # (reason, message): ScaledUp or ScaledDown
    state_json: str  # the tuner state for the annotation
    status_sections: dict[str, Any]  # status.observed, status.startup, status.tuning
    record: status_models.DecisionRecord | None  # appended to status.decisions
    conditions: list[conditions.Condition]  # SLOMet and MetricsAvailable


async def tune_once(
    body: kopf.Body,
    svc: models.LLMService,
    spec: policy_spec.PolicySpec,
    *,
    patch: kopf.Patch,
    ctx: context.OperatorContext,
    memory: TunerMemory,
    logger: kopf.Logger,
    now_s: float,
) -> decide_mod.Decision | None:
    """One tick: read (the Deployment, the pods, their metrics), plan (the policy's decision and every write
    it implies, pure), execute (the writes, in order)."""
    pods = await _read_pods(svc, ctx=ctx)
    if pods is None:
        return None
    endpoints = _ready_endpoints(pods.items)
    if not endpoints:
        # Nothing serves yet (pulling, loading, unschedulable): there is no latency to judge and no pod
        # to tune. Say so once instead of rewriting status every interval; replicas stay with reconcile.
        memory.previous = {}
        await _report_no_ready_pods(body, ctx=ctx, now_s=now_s)
        return None
    observation = await _observe(body, svc, spec, pods, endpoints, memory=memory, logger=logger, now_s=now_s)
    tick = plan(svc, spec, observation, now_s=now_s)
    await _execute(body, svc, tick, observation, patch=patch, ctx=ctx, memory=memory, logger=logger, now_s=now_s)
    return tick.decision


@dataclasses.dataclass(frozen=True, slots=True)
class _Pods:
    deployment: dict[str, Any]
    items: list[dict[str, Any]]


async def _read_pods(svc: models.LLMService, *, ctx: context.OperatorContext) -> _Pods | None:
    """The Deployment and its pods; None while there is nothing to tune."""
    deployment = await asyncio.to_thread(ctx.applier.read_deployment, svc.name, svc.namespace)
    if deployment is None:
        return None  # the reconcile handler has not created it yet
    if not model_cache.pods_allowed(svc.spec, svc.status.model_cache if svc.status else None):
        return None  # the model cache is (re)filling: reconcile holds the pods back, so there is nothing to tune
    pods = await asyncio.to_thread(ctx.applier.list_pods, svc.namespace, meta.selector_string(svc))
    return _Pods(deployment=deployment, items=pods)


async def _report_no_ready_pods(body: kopf.Body, *, ctx: context.OperatorContext, now_s: float) -> None:
    stored_conditions = (body.get("status", {}) or {}).get("conditions", []) or []
    current = conditions.find(stored_conditions, names.ConditionType.METRICS_AVAILABLE)
    if current is not None and current.get("reason") == "NoReadyPods":
        return
    updates = [
        conditions.Condition(
            names.ConditionType.METRICS_AVAILABLE,
            "False",
            "NoReadyPods",
            "no runtime pod is ready, so there are no metrics to collect",
        )
    ]
    if conditions.find(stored_conditions, names.ConditionType.SLO_MET) is None:
        updates.append(
            conditions.Condition(
                names.ConditionType.SLO_MET,
                "Unknown",
                "NotYetObserved",
                "no latency window has been observed yet",
            )
        )
    await _apply_conditions(body, updates, ctx=ctx, now_s=now_s)


async def _observe(
    body: kopf.Body,
    svc: models.LLMService,
    spec: policy_spec.PolicySpec,
    pods: _Pods,
    endpoints: dict[str, str],
    *,
    memory: TunerMemory,
    logger: kopf.Logger,
    now_s: float,
) -> Observation:
    """Collect the ready pods' metrics into a window against the last reading, and the tick's other inputs."""
    current, errors = await _collect(svc, endpoints, now_s=now_s)
    window = window_mod.from_scrapes(
        memory.previous, current, expected_pods=endpoints, spec=spec, now_s=now_s, max_age_s=2 * spec.interval_s
    )
    if errors:  # a pod that did not answer is missing data (never an idle pod): say why next to the rest
        window = dataclasses.replace(
            window, complete=False, reason="; ".join([window.reason, *errors.values()]).strip("; ")
        )
    memory.previous = {**{p: s for p, s in memory.previous.items() if p in endpoints}, **current}
    deployment = pods.deployment
    desired = int(deployment.get("spec", {}).get("replicas", svc.spec.replicas.effective) or 0)
    ready = int((deployment.get("status") or {}).get("readyReplicas", 0) or 0)
    loading_ages, started = bridge.pod_startups(pods.items, now_s=now_s)
    return Observation(
        endpoints=endpoints,
        window=window,
        policy_input=policy_spec.PolicyInput(
            spec=spec, current_replicas=desired, ready_replicas=ready, loading_ages_s=loading_ages, started=started
        ),
        state=_load_state(body, logger),
        tuning_now=reconcile.current_tuning(svc),
    )


def plan(svc: models.LLMService, spec: policy_spec.PolicySpec, seen: Observation, *, now_s: float) -> Plan:
    """The policy's decision and every write it implies. Pure: no clock (`now_s`), no I/O."""
    decision = decide_mod.decide(seen.policy_input, seen.window, seen.state, now=now_s)
    tuning_now = seen.tuning_now
    current_replicas = seen.policy_input.current_replicas
    actions = bridge.decision_actions(
        decision,
        current_replicas=current_replicas,
        current_limits=(tuning_now.max_batch_size or 0, tuning_now.max_batch_tokens or 0),
        current_shed=tuple(tuning_now.shed_classes),
    )
    decided = status_models.TuningStatus(
        max_batch_size=decision.max_batch_size,
        max_batch_tokens=decision.max_batch_tokens,
        shed_classes=list(decision.shed_classes),
        class_weights=tuning_now.class_weights,
        queue_limits=dict(decision.queue_limits),
    )
    # A new queue bound alone changes no replica, batch or shed class (no decision action to record), but the
    # runtime must get it: it goes out with the rest of the tuning (ConfigMap and live push).
    queue_bound_moved = decided.queue_limits != tuning_now.queue_limits
    reason_text = "; ".join(decision.reasons)[:1000]
    config_tuning: status_models.TuningStatus | None = None
    tuning_event: tuple[str, str] | None = None
    if actions and spec.advise:
        # Recorded (Event, metric, status.decisions), applied nowhere: no /scale write, no ConfigMap, no push.
        tuning_event = (
            "Advised",
            f"would {','.join(actions)}: replicas {current_replicas} -> {decision.replicas}, batch "
            f"{decision.max_batch_size} seqs / {decision.max_batch_tokens} tokens, shed "
            f"{list(decision.shed_classes)}: {reason_text}",
        )
    elif (queue_bound_moved and not spec.advise) or any(
        a in actions for a in ("batch_grow", "batch_shrink", "shed", "unshed")
    ):
        # New pods read the ConfigMap; running pods get the same values pushed live (no restart, _push_live).
        config_tuning = decided
        tuning_event = (
            "Tuned",
            f"{','.join(actions) or 'queue bound'}: batch {decision.max_batch_size} seqs / "
            f"{decision.max_batch_tokens} tokens, shed {list(decision.shed_classes)}, queue limits "
            f"{dict(decision.queue_limits)}: {reason_text}",
        )
    scale_to: int | None = None
    scale_event: tuple[str, str] | None = None
    if not spec.advise and ("scale_up" in actions or "scale_down" in actions):
        scale_to = decision.replicas
        scale_event = (
            "ScaledUp" if "scale_up" in actions else "ScaledDown",
            f"replicas -> {decision.replicas}: {'; '.join(decision.reasons)[:1000]}",
        )
    now = datetime.datetime.fromtimestamp(now_s, tz=datetime.UTC)
    # status.tuning is what the pods run with (reconcile renders it): advice never lands there.
    in_force = tuning_now if spec.advise else decided
    sections = {
        "observed": status_models.status_json(
            bridge.observed_status(seen.window, percentile=spec.slo.percentile, now=now)
        ),
        "startup": status_models.status_json(bridge.startup_status(decision)),
        "tuning": status_models.status_json(in_force),
    }
    return Plan(
        decision=decision,
        actions=actions,
        mode="advise" if spec.advise else "act",
        config_tuning=config_tuning,
        tuning_event=tuning_event,
        live_tuning=config_tuning or tuning_now,
        scale_to=scale_to,
        scale_event=scale_event,
        state_json=decision.state.to_json(),
        status_sections=sections,
        record=bridge.decision_record(decision, actions=actions, now=now, advise=spec.advise) if actions else None,
        conditions=bridge.decision_conditions(decision),
    )


async def _execute(
    body: kopf.Body,
    svc: models.LLMService,
    tick: Plan,
    seen: Observation,
    *,
    patch: kopf.Patch,
    ctx: context.OperatorContext,
    memory: TunerMemory,
    logger: kopf.Logger,
    now_s: float,
) -> None:
    """The plan's writes, in this order: metrics, status.tuning and the ConfigMap and its Event, the live
    push, /scale and its Event, then the state annotation, status and conditions."""
    for action in tick.actions:
        metrics.DECISIONS.labels(action=action, mode=tick.mode).inc()
    if tick.config_tuning is not None:
        await asyncio.to_thread(apply_tuning_change, body, svc, tick.config_tuning, ctx=ctx)
    if tick.tuning_event is not None:
        kopf.info(body, reason=tick.tuning_event[0], message=tick.tuning_event[1])
    # Pushed before the replicas are written: whoever sees the new replica count sees the tick done.
    await _push_live(
        svc,
        tuning=tick.live_tuning,
        started_with=seen.tuning_now,
        endpoints=seen.endpoints,
        memory=memory,
        ctx=ctx,
        logger=logger,
    )
    if tick.scale_to is not None:
        # Written where /scale reads it; the spec handler scales the Deployment (one writer of replicas).
        await asyncio.to_thread(ctx.applier.patch_llmservice_replicas, svc.name, svc.namespace, tick.scale_to)
        if tick.scale_event is not None:
            kopf.info(body, reason=tick.scale_event[0], message=tick.scale_event[1])
    patch.metadata.setdefault("annotations", {})[names.ANNOTATION_TUNER_STATE] = tick.state_json
    await asyncio.to_thread(_write_status, body, tick.status_sections, tick.record, ctx=ctx, logger=logger)
    await _apply_conditions(body, tick.conditions, ctx=ctx, now_s=now_s)


def apply_tuning_change(
    body: kopf.Body, svc: models.LLMService, tuning: status_models.TuningStatus, *, ctx: context.OperatorContext
) -> None:
    """status.tuning first, then the ConfigMap rendered from it.

    The spec handler renders the ConfigMap from the copy of the object it read, then re-reads status.tuning
    and reconciles again if it moved (reconcile.write_tuning). In this order a reconcile holding an older
    copy either applied its ConfigMap before this one (which overwrites it) or re-reads after this status
    write and renders again: the ConfigMap never keeps stale limits. The other way round, a reconcile could
    apply its stale ConfigMap after this one and re-read before this tick's status write.
    """
    metadata = body.get("metadata", {})
    name, namespace = str(metadata.get("name")), str(metadata.get("namespace"))
    ctx.applier.patch_llmservice_status(name, namespace, {"tuning": status_models.status_json(tuning)})
    config = configmap.build_config_map(svc, tuning=tuning)
    kopf.adopt(config, owner=body)
    ctx.applier.apply(config)


STATUS_WRITE_ATTEMPTS = 5


def _write_status(
    body: kopf.Body,
    sections: dict[str, Any],
    record: status_models.DecisionRecord | None,
    *,
    ctx: context.OperatorContext,
    logger: kopf.Logger,
) -> None:
    """Merge-patch the tick's status sections, appending `record` to status.decisions.

    The history is read-modify-write, so the patch is pinned to the resourceVersion it was read from: an
    object changed meanwhile (any writer; the tick itself wrote /scale) is re-read and the record appended
    to the history as it is now, so no applied action's record is ever lost to a stale copy.
    """
    metadata = body.get("metadata", {})
    name, namespace = str(metadata.get("name")), str(metadata.get("namespace"))
    seen: Mapping[str, Any] | None = body
    for _ in range(STATUS_WRITE_ATTEMPTS):
        if seen is None:
            return  # deleted meanwhile
        # The version first: kopf may refresh the live body meanwhile, and a history newer than the version
        # only fails the patch, while the reverse would write a stale history.
        version = (seen.get("metadata") or {}).get("resourceVersion")
        patch = dict(sections)
        if record is not None:
            stored = (seen.get("status") or {}).get("decisions") or []
            patch["decisions"] = [status_models.status_json(r) for r in bridge.bounded_history(stored, record)]
        if ctx.applier.patch_llmservice_status(name, namespace, patch, resource_version=version):
            return
        seen = ctx.applier.read_llmservice(name, namespace)
    logger.warning(
        "status of %s/%s changed under each of %d writes; this tick's status is not recorded",
        namespace,
        name,
        STATUS_WRITE_ATTEMPTS,
    )


async def _apply_conditions(
    body: kopf.Body, updates: list[conditions.Condition], *, ctx: context.OperatorContext, now_s: float
) -> None:
    """Server-side apply the tuner's conditions (all of its types) as their one writer; never a merge patch
    of the whole list, which could revert a condition the rollout refresh wrote a moment before."""
    metadata = body.get("metadata", {})
    owned = conditions.for_apply(
        (body.get("status", {}) or {}).get("conditions", []) or [],
        updates,
        owned=conditions.TUNER_TYPES,
        now=datetime.datetime.fromtimestamp(now_s, tz=datetime.UTC),
        observed_generation=metadata.get("generation"),
    )
    await asyncio.to_thread(
        ctx.applier.apply_llmservice_conditions,
        str(metadata.get("name")),
        str(metadata.get("namespace")),
        owned,
        field_manager=conditions.TUNER_WRITER,
    )


async def _push_live(
    svc: models.LLMService,
    *,
    tuning: status_models.TuningStatus,
    started_with: status_models.TuningStatus,
    endpoints: dict[str, str],
    memory: TunerMemory,
    ctx: context.OperatorContext,
    logger: kopf.Logger,
) -> None:
    """Every tick: each ready pod that has not taken the live part of the config in force (the tuner's
    limits and shedding, the spec's classes, default class and SLO targets) gets it pushed, so a spec change
    to those reaches running pods within one interval and without a restart. A pod seen for the first time
    is taken to run the ConfigMap it started with (the spec and the tuning in force before this tick): it
    gets a push only for what differs, so nothing is pushed while nothing changes (advice pushes nothing).
    A pod that refused or did not answer is tried again next tick."""
    body = push.live_body(configmap.runtime_config(svc.spec, tuning=tuning))
    digest = push.digest(body)
    memory.pushed = {pod: d for pod, d in memory.pushed.items() if pod in endpoints}
    if any(pod not in memory.pushed for pod in endpoints):
        known = push.digest(push.live_body(configmap.runtime_config(svc.spec, tuning=started_with)))
        memory.pushed.update({pod: known for pod in endpoints if pod not in memory.pushed})
    due = {pod: url for pod, url in endpoints.items() if memory.pushed.get(pod) != digest}
    if not due:
        return
    token_secret = await asyncio.to_thread(ctx.applier.read_secret, meta.admin_secret_name(svc), svc.namespace)
    token = secret.read_admin_token(token_secret) if token_secret else None
    if not token:
        return
    result = await push.push_tuning(due, token=token, body=body)
    memory.pushed.update(dict.fromkeys(result.ok, digest))
    for pod, error in result.failed.items():
        logger.warning("could not push the live config to %s: %s", pod, error)


@kopf.timer(names.GROUP, names.VERSION, names.PLURAL, interval=TICK_S, initial_delay=TICK_S)
async def tune(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    ctx = context.get(memo)
    memory = memo.get(MEMO_KEY)
    if not isinstance(memory, TunerMemory):
        memory = TunerMemory()
        memo[MEMO_KEY] = memory
    try:
        svc = models.load_stored(reconcile.plain_body(body))
    except ValueError:
        return  # the spec handler reports an invalid object
    spec = bridge.policy_spec_of(svc.spec)  # parsed once per tick: durations to seconds, the policy's types
    now_s = time.time()
    if now_s - memory.last_tick_s < spec.interval_s - 0.5:
        return
    memory.last_tick_s = now_s
    decision = await tune_once(body, svc, spec, patch=patch, ctx=ctx, memory=memory, logger=logger, now_s=now_s)
    if decision is not None:
        logger.info(
            "tuned %s/%s: replicas %d, batch %d/%d, shed %s; %s",
            svc.namespace,
            svc.name,
            decision.replicas,
            decision.max_batch_size,
            decision.max_batch_tokens,
            list(decision.shed_classes),
            json.dumps(list(decision.reasons))[:500],
        )
