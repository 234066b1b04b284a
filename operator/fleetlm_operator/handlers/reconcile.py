"""Reconcile an LLMService into its children and keep its status in step with its pods.

On create, update and resume: parse the stored object, render every child with the builders, adopt
them (owner references, so deleting the LLMService garbage-collects them), apply them with server-side
apply, and write status. The admin-token Secret is created once and never rotated by a reconcile (the
pods hold it). A ServiceMonitor is applied only where its CRD is installed.

Deployment and pod events refresh the owner's status (ready replicas, phase, rollout and capacity
conditions) without re-rendering anything.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import secrets
import time
from collections.abc import Mapping
from typing import Any

import kopf

from fleetlm_operator import metrics
from fleetlm_operator.api import fields, models, names, status_models
from fleetlm_operator.builders import (
    configmap,
    deployment,
    inferencepool,
    meta,
    model_cache,
    pdb,
    router,
    secret,
    service,
    servicemonitor,
)
from fleetlm_operator.handlers import context
from fleetlm_operator.handlers import model_cache as model_cache_handler
from fleetlm_operator.policy import spec as policy_spec
from fleetlm_operator.status import conditions, summary
from fleetlm_operator.status import model_cache as model_cache_status


def _now() -> datetime.datetime:
    return datetime.datetime.now(tz=datetime.UTC)


def plain_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """The LLMService as the models expect it: only the metadata fields they read."""
    metadata = body.get("metadata", {})
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {
            key: metadata.get(key)
            for key in ("name", "namespace", "uid", "generation", "labels", "annotations")
            if metadata.get(key) is not None
        },
        "spec": dict(body.get("spec", {})),
        "status": dict(body.get("status", {}) or {}) or None,
    }


def current_tuning(svc: models.LLMService) -> status_models.TuningStatus:
    """The limits the pods should run with now.

    With `autotune` the tuner owns the limits: the ones in status are kept, clamped into the spec's
    (possibly changed) ranges. Without it the spec's values apply as written. Shedding the tuner set
    survives only for classes that still exist; class weights are the spec's.
    """
    initial = models.initial_tuning(svc.spec)
    stored = svc.status.tuning if svc.status is not None and svc.status.tuning is not None else None
    if stored is None:
        return initial
    size, tokens = initial.max_batch_size, initial.max_batch_tokens
    if svc.spec.batching.autotune:
        size_range, tokens_range = svc.spec.batching.max_batch_size_range, svc.spec.batching.max_batch_tokens_range
        size = min(max(stored.max_batch_size or size or 1, size_range.min), size_range.max)
        tokens = min(max(stored.max_batch_tokens or tokens or 1, tokens_range.min), tokens_range.max)
    class_names = {qos_class.name for qos_class in svc.spec.qos.classes}
    # The tuner's queue bounds, for classes that still exist, never above a class's queueLimit as edited.
    caps = {qos_class.name: qos_class.queue_limit for qos_class in svc.spec.qos.classes}
    queue_limits = {
        name: min(limit, caps.get(name) or limit)
        for name, limit in stored.queue_limits.items()
        if name in class_names or (not class_names and name == policy_spec.DEFAULT_CLASS_NAME)
    }
    return status_models.TuningStatus(
        max_batch_size=size,
        max_batch_tokens=tokens,
        shed_classes=[name for name in stored.shed_classes if name in class_names],
        # The spec's weights as edited: no policy moves weights, and a stored copy would undo a reweight.
        class_weights=dict(initial.class_weights or {}),
        queue_limits=queue_limits,
    )


def render_children(
    svc: models.LLMService,
    *,
    tuning: status_models.TuningStatus,
    default_image: str,
    with_service_monitor: bool,
    with_deployment: bool = True,
    model_bytes: int | None = None,
    router_image: str = "",
    with_inference_pool: bool = False,
    objective_api_version: str | None = None,
) -> list[dict[str, Any]]:
    """Every child but the admin Secret, in the order they should be applied (config before pods).

    Without `with_deployment` (the model cache is not Ready) the Deployment is left out: not created, or
    left as it is, so no pod starts on a checkpoint that is not there yet. The router's objects come with
    `spec.router.enabled`; the InferencePool (and one objective per class) only where the Gateway API
    Inference Extension CRDs are installed, as with the ServiceMonitor.
    """
    children = [
        configmap.build_config_map(svc, tuning=tuning),
        service.build_service(svc),
        *(
            [deployment.build_deployment(svc, default_image=default_image, model_bytes=model_bytes)]
            if with_deployment
            else []
        ),
        pdb.build_pod_disruption_budget(svc),
    ]
    if with_service_monitor:
        children.append(servicemonitor.build_service_monitor(svc))
    if svc.spec.router.enabled:
        children.extend(router.build_router_children(svc, default_image=router_image or default_image))
    if with_inference_pool:
        children.append(inferencepool.build_inference_pool(svc))
        if objective_api_version is not None:
            children.extend(inferencepool.build_objectives(svc, api_version=objective_api_version))
    return children


def _objective_api_version(ctx: context.OperatorContext) -> str | None:
    for api_version in inferencepool.OBJECTIVE_API_VERSIONS:
        if ctx.applier.has_kind(api_version, inferencepool.OBJECTIVE_KIND):
            return api_version
    return None


def _remove_disabled_router(svc: models.LLMService, ctx: context.OperatorContext) -> None:
    """Switching the router off removes its objects (pods first, permissions last); one read when none exist."""
    if ctx.applier.read_deployment(router.router_name(svc), svc.namespace) is None:
        return
    for child in reversed(router.build_router_children(svc, default_image="")):
        ctx.applier.delete_if_present(child["apiVersion"], child["kind"], child["metadata"]["name"], svc.namespace)


def reconcile(body: kopf.Body, *, ctx: context.OperatorContext, logger: kopf.Logger, cause: str) -> dict[str, Any]:
    """Apply every child of `body`; returns the status to write (its "tuning" through `write_tuning`)."""
    started = time.monotonic()
    try:
        svc = models.load_stored(plain_body(body))
    except ValueError as error:
        metrics.RECONCILES.labels(result="invalid").inc()
        # The API server's schema should have refused it; never half-create children for it.
        raise kopf.PermanentError(f"invalid LLMService: {error}") from error
    tuning = current_tuning(svc)

    token_secret = secret.build_admin_token_secret(svc, token=secrets.token_urlsafe(32))
    kopf.adopt(token_secret, owner=body)
    _, created = ctx.applier.create_if_missing(token_secret)
    if created:
        metrics.CHILDREN_APPLIED.labels(kind="Secret").inc()

    cache = model_cache_handler.ensure(svc, body=body, ctx=ctx)
    if cache is not None:
        model_cache_handler.post_transition_event(body, before=model_cache_handler.stored_cache(body), after=cache)

    with_monitor = ctx.applier.has_kind(servicemonitor.API_VERSION, "ServiceMonitor")
    with_pool = ctx.applier.has_kind(inferencepool.POOL_API_VERSION, inferencepool.POOL_KIND)
    objective_version = _objective_api_version(ctx) if with_pool else None
    if not svc.spec.router.enabled:
        _remove_disabled_router(svc, ctx)
    applied = []
    for child in render_children(
        svc,
        tuning=tuning,
        default_image=ctx.settings.runtime_image,
        with_service_monitor=with_monitor,
        with_deployment=model_cache.pods_allowed(svc.spec, cache),
        model_bytes=model_cache.model_bytes(svc.spec, cache),
        router_image=ctx.settings.router_image,
        with_inference_pool=with_pool,
        objective_api_version=objective_version,
    ):
        kopf.adopt(child, owner=body)
        ctx.applier.apply(child)
        metrics.CHILDREN_APPLIED.labels(kind=child["kind"]).inc()
        applied.append(f"{child['kind']}/{child['metadata']['name']}")

    if cause != "resume":
        kopf.info(body, reason="Reconciled", message=f"applied {', '.join(applied)}")
    status = rollout_status(svc, body=body, ctx=ctx, cache=cache)
    status["tuning"] = status_models.status_json(tuning)  # written by `write_tuning`, never in a plain merge patch
    _export_service_gauges(svc, tuning=tuning, ready=int(status.get("readyReplicas") or 0))
    metrics.RECONCILES.labels(result="ok").inc()
    metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
    logger.info("reconciled %s/%s (%s): %s", svc.namespace, svc.name, cause, ", ".join(applied))
    return status


def _export_service_gauges(svc: models.LLMService, *, tuning: status_models.TuningStatus, ready: int) -> None:
    labels = {"namespace": svc.namespace, "llmservice": svc.name}
    metrics.SERVICE_REPLICAS.labels(**labels, state="desired").set(svc.spec.replicas.effective)
    metrics.SERVICE_REPLICAS.labels(**labels, state="ready").set(ready)
    if svc.spec.slo is not None:
        for slo, value in (("ttft", svc.spec.slo.ttft), ("tpot", svc.spec.slo.tpot)):
            if value is not None:
                metrics.SERVICE_SLO_TARGET.labels(**labels, slo=slo).set(fields.parse_duration_s(value))
    metrics.SERVICE_BATCH_LIMIT.labels(**labels, limit="max_batch_size").set(tuning.max_batch_size or 0)
    metrics.SERVICE_BATCH_LIMIT.labels(**labels, limit="max_batch_tokens").set(tuning.max_batch_tokens or 0)


def rollout_status(
    svc: models.LLMService,
    *,
    body: Mapping[str, Any],
    ctx: context.OperatorContext,
    cache: status_models.ModelCacheStatus | None = None,
) -> dict[str, Any]:
    """Status fields derived from the Deployment and its pods, merged into the stored conditions.

    `cache` is the model cache's state as just read; unset, the one stored in status is used.
    """
    found = ctx.applier.read_deployment(svc.name, svc.namespace)
    pods = ctx.applier.list_pods(svc.namespace, meta.selector_string(svc))
    return render_rollout_status(svc, body=body, deployment=found, pods=pods, cache=cache, now=_now())


def render_rollout_status(
    svc: models.LLMService,
    *,
    body: Mapping[str, Any],
    deployment: Mapping[str, Any] | None,
    pods: list[dict[str, Any]],
    cache: status_models.ModelCacheStatus | None,
    now: datetime.datetime,
) -> dict[str, Any]:
    """`rollout_status` without the reads: pure, so every status it writes can be checked against the CRD."""
    rollout = summary.summarize(deployment=deployment, pods=pods, min_ready=svc.spec.replicas.min)
    stored = body.get("status", {}) or {}
    fresh = cache is not None  # only a cache state just read from its Job is written back
    if cache is None and svc.spec.model.cached:
        cache = model_cache_handler.stored_cache(body)
    found_conditions = list(rollout.conditions)
    phase = rollout.phase
    if cache is not None and svc.spec.model.cached:
        found_conditions += model_cache_status.cache_conditions(cache, ready_replicas=rollout.ready_replicas)
        phase = model_cache_status.phase(phase, cache, ready_replicas=rollout.ready_replicas)
    # Only this writer's conditions (rollout and cache): the caller server-side applies them
    # (`apply_conditions`); a type it no longer computes (the cache turned off) is dropped by the apply.
    owned = conditions.for_apply(
        stored.get("conditions", []) or [],
        found_conditions,
        owned={c.type for c in found_conditions},
        now=now,
        observed_generation=body.get("metadata", {}).get("generation"),
    )
    cache_fields: dict[str, Any] = {}
    if fresh and cache is not None and svc.spec.model.cached:
        cache_fields["modelCache"] = model_cache_handler.status_patch(cache)
    elif not svc.spec.model.cached and stored.get("modelCache"):
        cache_fields["modelCache"] = None  # the cache was turned off: drop what status said about it
    fields = status_models.status_json(
        status_models.LLMServiceStatus(
            phase=phase,
            replicas=rollout.replicas,
            ready_replicas=rollout.ready_replicas,
            selector=meta.selector_string(svc),
            endpoint=router.endpoint_url(svc) if svc.spec.router.enabled else service.endpoint_url(svc),
            observed_generation=body.get("metadata", {}).get("generation"),
        )
    )
    fields.pop("conditions", None)  # the model's empty default; this writer's own go by server-side apply
    fields.pop("decisions", None)
    return {**fields, "conditions": owned, **cache_fields}


def write_tuning(body: Mapping[str, Any], tuning: dict[str, Any], *, ctx: context.OperatorContext) -> bool:
    """Write status.tuning as the reconcile of `body` computed it; False when `body` is stale.

    The tuner changes status.tuning between reconciles (after pushing new limits to the pods), so a
    reconcile that read the object before such a change would revert it, in status and in the ConfigMap
    it rendered. The object is re-read after the children were applied: if its tuning moved since `body`,
    nothing is written and the caller reconciles again from the fresh object. The write itself is pinned
    to the version read, so a tuner tick between the read and the write is caught the same way.
    """
    metadata = body.get("metadata", {})
    name, namespace = str(metadata.get("name")), str(metadata.get("namespace"))
    seen = ((body.get("status") or {}).get("tuning")) or None
    fresh = ctx.applier.read_llmservice(name, namespace)
    if fresh is None:
        return True  # deleted: nothing to write
    current = ((fresh.get("status") or {}).get("tuning")) or None
    if current != seen:
        return False
    if current == tuning:
        return True
    version = (fresh.get("metadata") or {}).get("resourceVersion")
    return ctx.applier.patch_llmservice_status(name, namespace, {"tuning": tuning}, resource_version=version)


def apply_conditions(
    body: Mapping[str, Any],
    rollout_conditions: list[dict[str, Any]],
    *,
    ctx: context.OperatorContext,
    only_if_changed: bool,
) -> None:
    """Server-side apply the rollout's conditions as their writer; until the tuner has written its own,
    say they are not known yet (unforced, so a value the tuner wrote meanwhile is never reverted)."""
    metadata = body.get("metadata", {})
    name, namespace = str(metadata.get("name")), str(metadata.get("namespace"))
    stored = (body.get("status", {}) or {}).get("conditions", []) or []
    if not only_if_changed or conditions.differ(stored, rollout_conditions):
        ctx.applier.apply_llmservice_conditions(
            name, namespace, rollout_conditions, field_manager=conditions.ROLLOUT_WRITER
        )
    if not any(c.get("type") in conditions.TUNER_TYPES for c in stored):
        placeholders = conditions.for_apply(
            stored,
            [
                conditions.Condition(
                    names.ConditionType.SLO_MET, "Unknown", "NotYetObserved", "no latency window has been observed yet"
                ),
                conditions.Condition(
                    names.ConditionType.METRICS_AVAILABLE,
                    "Unknown",
                    "NotYetCollected",
                    "metrics have not been collected yet",
                ),
            ],
            owned=conditions.TUNER_TYPES,
            now=_now(),
            observed_generation=metadata.get("generation"),
        )
        ctx.applier.apply_llmservice_conditions(
            name, namespace, placeholders, field_manager=conditions.PLACEHOLDER_WRITER, force=False
        )


@kopf.on.resume(names.GROUP, names.VERSION, names.PLURAL)
@kopf.on.create(names.GROUP, names.VERSION, names.PLURAL)
@kopf.on.update(names.GROUP, names.VERSION, names.PLURAL, field="spec")
def on_spec(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger, reason: str, **_: Any) -> None:
    ctx = context.get(memo)
    status = reconcile(body, ctx=ctx, logger=logger, cause=str(reason))
    if not write_tuning(body, status.pop("tuning"), ctx=ctx):
        # kopf runs the handler again with the object as it is now; nothing else is written from this copy.
        raise kopf.TemporaryError("status.tuning changed during the reconcile; reconciling the fresh object", delay=1)
    apply_conditions(body, status.pop("conditions"), ctx=ctx, only_if_changed=False)
    for key, value in status.items():
        patch.status[key] = value


def _refresh_owner(namespace: str | None, owner: str | None, *, memo: kopf.Memo) -> None:
    if not namespace or not owner:
        return
    ctx = context.get(memo)
    stored = ctx.applier.read_llmservice(owner, namespace)
    if stored is None:
        return
    try:
        svc = models.load_stored(plain_body(stored))
    except ValueError:
        return  # the spec handler reports invalid objects
    status = rollout_status(svc, body=stored, ctx=ctx)
    # Conditions carry timestamps that only move on transitions, so an unchanged rollout writes nothing.
    apply_conditions(stored, status.pop("conditions"), ctx=ctx, only_if_changed=True)
    current = stored.get("status", {}) or {}
    changed = {key: value for key, value in status.items() if current.get(key) != value}
    if changed:
        ctx.applier.patch_llmservice_status(owner, namespace, changed)


@kopf.on.delete(names.GROUP, names.VERSION, names.PLURAL, optional=True)
def on_delete(meta: kopf.Meta, **_: Any) -> None:
    # optional=True: no finalizer; children go by garbage collection, this only forgets metrics.
    metrics.forget_service(str(meta.namespace), str(meta.name))


_CHILD_FILTER = {names.LABEL_MANAGED_BY: names.MANAGED_BY}
# A rollout produces a burst of Deployment and Pod events; refresh each owner once per burst.
REFRESH_DEBOUNCE_S = 0.5
_pending_refresh: set[tuple[str, str]] = set()
_refresh_tasks: set[asyncio.Task[None]] = set()


def _request_refresh(namespace: str | None, owner: str | None, *, memo: kopf.Memo) -> None:
    if not namespace or not owner or (namespace, owner) in _pending_refresh:
        return
    _pending_refresh.add((namespace, owner))

    async def refresh_later() -> None:
        await asyncio.sleep(REFRESH_DEBOUNCE_S)
        _pending_refresh.discard((namespace, owner))
        try:
            await asyncio.to_thread(_refresh_owner, namespace, owner, memo=memo)
        except kopf.TemporaryError as error:  # still starting, or no longer the leader: nothing to refresh
            logging.getLogger(__name__).info("status refresh of %s/%s skipped: %s", namespace, owner, error)
        except Exception:  # a failed refresh is retried by the next event; never kill the loop
            logging.getLogger(__name__).exception("status refresh of %s/%s failed", namespace, owner)

    task = asyncio.create_task(refresh_later())
    _refresh_tasks.add(task)
    task.add_done_callback(_refresh_tasks.discard)


@kopf.on.event("apps", "v1", "deployments", labels=_CHILD_FILTER)
async def on_deployment_event(meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    _request_refresh(meta.namespace, meta.labels.get(names.LABEL_LLMSERVICE), memo=memo)


@kopf.on.event("", "v1", "pods", labels=_CHILD_FILTER)
async def on_pod_event(meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    _request_refresh(meta.namespace, meta.labels.get(names.LABEL_LLMSERVICE), memo=memo)
