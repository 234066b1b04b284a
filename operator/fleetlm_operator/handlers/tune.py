"""The SLO tuner, a kopf timer per LLMService: collect -> policy.decide -> act.

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
import logging
import time
from collections.abc import Mapping
from typing import Any

import kopf

from fleetlm_operator import bridge, metrics
from fleetlm_operator.act import push
from fleetlm_operator.api import fields, models, names, status_models
from fleetlm_operator.builders import configmap, meta, model_cache, secret
from fleetlm_operator.collect import prometheus, scrape
from fleetlm_operator.handlers import context, reconcile
from fleetlm_operator.policy import decide as decide_mod
from fleetlm_operator.policy import spec as policy_spec
from fleetlm_operator.policy import state as state_mod
from fleetlm_operator.policy import window as window_mod
from fleetlm_operator.status import conditions

TICK_S = 5.0  # how often the timer wakes; the tuner acts every spec.autoscaling.interval
ANNOTATION_STATE = f"{names.GROUP}/tuner-state"
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


def _load_state(body: kopf.Body, logger: logging.Logger) -> state_mod.TunerState:
    raw = body.get("metadata", {}).get("annotations", {}).get(ANNOTATION_STATE)
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


async def tune_once(
    body: kopf.Body,
    *,
    patch: kopf.Patch,
    ctx: context.OperatorContext,
    memory: TunerMemory,
    logger: logging.Logger,
    now_s: float,
) -> decide_mod.Decision | None:
    svc = models.load_stored(reconcile.plain_body(body))
    spec = bridge.policy_spec_of(svc.spec)
    deployment = await asyncio.to_thread(ctx.applier.read_deployment, svc.name, svc.namespace)
    if deployment is None:
        return None  # the reconcile handler has not created it yet
    if not model_cache.pods_allowed(svc.spec, svc.status.model_cache if svc.status else None):
        return None  # the model cache is (re)filling: reconcile holds the pods back, so there is nothing to tune
    pods = await asyncio.to_thread(ctx.applier.list_pods, svc.namespace, meta.selector_string(svc))
    endpoints = _ready_endpoints(pods)
    if not endpoints:
        # Nothing serves yet (pulling, loading, unschedulable): there is no latency to judge and no pod
        # to tune. Say so once instead of rewriting status every interval; replicas stay with reconcile.
        memory.previous = {}
        stored_conditions = (body.get("status", {}) or {}).get("conditions", []) or []
        current = conditions.find(stored_conditions, names.ConditionType.METRICS_AVAILABLE)
        if current is None or current.get("reason") != "NoReadyPods":
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
        return None
    current, errors = await _collect(svc, endpoints, now_s=now_s)
    window = window_mod.from_scrapes(
        memory.previous, current, expected_pods=endpoints, spec=spec, now_s=now_s, max_age_s=2 * spec.interval_s
    )
    if errors:  # a pod that did not answer is missing data (never an idle pod): say why next to the rest
        window = dataclasses.replace(
            window, complete=False, reason="; ".join([window.reason, *errors.values()]).strip("; ")
        )
    memory.previous = {**{p: s for p, s in memory.previous.items() if p in endpoints}, **current}

    desired = int(deployment.get("spec", {}).get("replicas", svc.spec.replicas.effective) or 0)
    ready = int((deployment.get("status") or {}).get("readyReplicas", 0) or 0)
    state = _load_state(body, logger)
    loading_ages, started = bridge.pod_startups(pods, now_s=now_s)
    policy_input = policy_spec.PolicyInput(
        spec=spec, current_replicas=desired, ready_replicas=ready, loading_ages_s=loading_ages, started=started
    )
    decision = decide_mod.decide(policy_input, window, state, now=now_s)
    tuning_now = reconcile.current_tuning(svc)
    current_limits = (tuning_now.max_batch_size or 0, tuning_now.max_batch_tokens or 0)
    actions = bridge.decision_actions(
        decision, current_replicas=desired, current_limits=current_limits, current_shed=tuple(tuning_now.shed_classes)
    )
    in_force = await _act(
        svc, body=body, decision=decision, actions=actions, current_replicas=desired, tuning_now=tuning_now, ctx=ctx
    )
    # Pushed before the replicas are written: whoever sees the new replica count sees the tick done.
    await _push_live(
        svc, tuning=in_force, started_with=tuning_now, endpoints=endpoints, memory=memory, ctx=ctx, logger=logger
    )
    if svc.spec.autoscaling.mode != "advise" and ("scale_up" in actions or "scale_down" in actions):
        # Written where /scale reads it; the spec handler scales the Deployment (one writer of replicas).
        await asyncio.to_thread(ctx.applier.patch_llmservice_replicas, svc.name, svc.namespace, decision.replicas)
        kopf.info(
            body,
            reason="ScaledUp" if "scale_up" in actions else "ScaledDown",
            message=f"replicas -> {decision.replicas}: {'; '.join(decision.reasons)[:1000]}",
        )

    now = datetime.datetime.fromtimestamp(now_s, tz=datetime.UTC)
    patch.metadata.setdefault("annotations", {})[ANNOTATION_STATE] = decision.state.to_json()
    # status.tuning is what the pods run with (reconcile renders it): advice never lands there.
    in_force = (
        tuning_now
        if spec.advise
        else status_models.TuningStatus(
            max_batch_size=decision.max_batch_size,
            max_batch_tokens=decision.max_batch_tokens,
            shed_classes=list(decision.shed_classes),
            class_weights=tuning_now.class_weights,
        )
    )
    sections = {
        "observed": status_models.status_json(bridge.observed_status(window, percentile=spec.slo.percentile, now=now)),
        "startup": status_models.status_json(bridge.startup_status(decision)),
        "tuning": status_models.status_json(in_force),
    }
    record = bridge.decision_record(decision, actions=actions, now=now, advise=spec.advise) if actions else None
    await asyncio.to_thread(_write_status, body, sections, record, ctx=ctx, logger=logger)
    await _apply_conditions(body, bridge.decision_conditions(decision), ctx=ctx, now_s=now_s)
    return decision


STATUS_WRITE_ATTEMPTS = 5


def _write_status(
    body: kopf.Body,
    sections: dict[str, Any],
    record: status_models.DecisionRecord | None,
    *,
    ctx: context.OperatorContext,
    logger: logging.Logger,
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


async def _act(
    svc: models.LLMService,
    *,
    body: kopf.Body,
    decision: decide_mod.Decision,
    actions: list[str],
    current_replicas: int,
    tuning_now: status_models.TuningStatus,
    ctx: context.OperatorContext,
) -> status_models.TuningStatus:
    """Record advice, or rewrite the ConfigMap for a tuning change; the tuning the pods should now run with.
    (The replicas are written by the caller, after the push.)"""
    reason_text = "; ".join(decision.reasons)[:1000]
    mode = "advise" if svc.spec.autoscaling.mode == "advise" else "act"
    for action in actions:
        metrics.DECISIONS.labels(action=action, mode=mode).inc()
    if actions and mode == "advise":
        # Recorded (Event, metric, status.decisions), applied nowhere: no /scale write, no ConfigMap, no push.
        kopf.info(
            body,
            reason="Advised",
            message=f"would {','.join(actions)}: replicas {current_replicas} -> {decision.replicas}, batch "
            f"{decision.max_batch_size} seqs / {decision.max_batch_tokens} tokens, shed "
            f"{list(decision.shed_classes)}: {reason_text}",
        )
        return tuning_now
    tuning_changed = any(a in actions for a in ("batch_grow", "batch_shrink", "shed", "unshed"))
    if not tuning_changed:
        return tuning_now
    tuning = status_models.TuningStatus(
        max_batch_size=decision.max_batch_size,
        max_batch_tokens=decision.max_batch_tokens,
        shed_classes=list(decision.shed_classes),
        class_weights=tuning_now.class_weights,
    )
    # New pods read the ConfigMap; running pods get the same values pushed live (no restart, _push_live).
    config = configmap.build_config_map(svc, tuning=tuning)
    kopf.adopt(config, owner=body)
    await asyncio.to_thread(ctx.applier.apply, config)
    kopf.info(
        body,
        reason="Tuned",
        message=f"{','.join(actions)}: batch {decision.max_batch_size} seqs / "
        f"{decision.max_batch_tokens} tokens, shed {list(decision.shed_classes)}: "
        f"{reason_text}",
    )
    return tuning


async def _push_live(
    svc: models.LLMService,
    *,
    tuning: status_models.TuningStatus,
    started_with: status_models.TuningStatus,
    endpoints: dict[str, str],
    memory: TunerMemory,
    ctx: context.OperatorContext,
    logger: logging.Logger,
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
async def tune(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    ctx = context.get(memo)
    memory = memo.get(MEMO_KEY)
    if not isinstance(memory, TunerMemory):
        memory = TunerMemory()
        memo[MEMO_KEY] = memory
    try:
        svc = models.load_stored(reconcile.plain_body(body))
    except ValueError:
        return  # the spec handler reports an invalid object
    interval_s = fields.parse_duration_s(svc.spec.autoscaling.interval)
    now_s = time.time()
    if now_s - memory.last_tick_s < interval_s - 0.5:
        return
    memory.last_tick_s = now_s
    decision = await tune_once(body, patch=patch, ctx=ctx, memory=memory, logger=logger, now_s=now_s)
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
