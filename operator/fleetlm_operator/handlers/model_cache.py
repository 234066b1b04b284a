"""Keep an LLMService's model cache: create its claim and fill Job once, follow the fill, gate the pods.

`ensure()` runs inside every reconcile: it creates the claim (owned by the LLMService only when
`whenDeleted: Delete`, so that `Retain` keeps it when the LLMService goes) and the fill Job with its
ServiceAccount and Role (owned, so they go with the LLMService), and returns the cache's state read
from the Job. Nothing here ever recreates a finished Job: a failed fill stays Failed (the Job's
backoffLimit bounded its retries) until the spec changes, so a bad source never turns into a loop.

Fill Jobs report progress in an annotation; `on_job_event` turns each report into
`status.modelCache` (bytes done), and on a phase change runs a full reconcile, which creates the
Deployment once the cache is Ready. Events: ModelCacheFilling, ModelCacheReady, ModelCacheFailed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import kopf
from kubernetes import client
from kubernetes.client import exceptions

from fleetlm_operator.api import models, names, status_models
from fleetlm_operator.builders import model_cache
from fleetlm_operator.handlers import context

logger = logging.getLogger(__name__)


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in (obj.get("metadata") or {}).get("ownerReferences") or [])


def _sync_claim_owner(
    claim: Mapping[str, Any], *, body: kopf.Body, delete_with_owner: bool, api: client.CoreV1Api
) -> None:
    """Add or drop the LLMService's owner reference on an existing claim when whenDeleted changes."""
    uid = str(body["metadata"]["uid"])
    owned = _owned_by(claim, uid)
    if owned == delete_with_owner:
        return
    others = [ref for ref in (claim.get("metadata") or {}).get("ownerReferences") or [] if ref.get("uid") != uid]
    if delete_with_owner:
        probe: dict[str, Any] = {"metadata": {}}
        kopf.append_owner_reference(probe, owner=body)
        others += probe["metadata"]["ownerReferences"]
    metadata = claim["metadata"]
    api.patch_namespaced_persistent_volume_claim(
        metadata["name"], metadata["namespace"], {"metadata": {"ownerReferences": others or None}}
    )


def read_job(api: client.BatchV1Api, name: str, namespace: str) -> dict[str, Any] | None:
    try:
        job = api.read_namespaced_job(name, namespace)
    except exceptions.ApiException as error:
        if error.status == 404:
            return None
        raise
    return dict(api.api_client.sanitize_for_serialization(job))


def ensure(
    svc: models.LLMService, *, body: kopf.Body, ctx: context.OperatorContext
) -> status_models.ModelCacheStatus | None:
    """Create what the cache needs if missing; returns its state (None when the spec has no cache)."""
    if not svc.spec.model.cached or svc.spec.model.cache is None:
        return None
    delete_with_owner = svc.spec.model.cache.when_deleted == "Delete"
    claim = model_cache.build_claim(svc)
    if delete_with_owner:
        kopf.append_owner_reference(claim, owner=body)
    existing, created = ctx.applier.create_if_missing(claim)
    if not created:
        _sync_claim_owner(
            existing, body=body, delete_with_owner=delete_with_owner, api=client.CoreV1Api(ctx.api_client)
        )
    for child in (
        model_cache.build_service_account(svc),
        model_cache.build_role(svc),
        model_cache.build_role_binding(svc),
    ):
        kopf.append_owner_reference(child, owner=body)
        ctx.applier.apply(child)
    job = model_cache.build_job(svc, default_image=ctx.settings.runtime_image)
    kopf.append_owner_reference(job, owner=body)
    ctx.applier.create_if_missing(job)  # never updated: a Job's template is immutable, its name has the source
    found = read_job(client.BatchV1Api(ctx.api_client), model_cache.job_name(svc), svc.namespace)
    return model_cache.cache_status(svc, found)


def stored_cache(body: Mapping[str, Any]) -> status_models.ModelCacheStatus | None:
    raw = (body.get("status") or {}).get("modelCache")
    try:
        return status_models.ModelCacheStatus.model_validate(raw) if raw else None
    except ValueError:
        return None


def post_transition_event(
    body: kopf.Body, *, before: status_models.ModelCacheStatus | None, after: status_models.ModelCacheStatus
) -> None:
    """One Event per phase change of the cache."""
    if before is not None and before.phase == after.phase:
        return
    if after.phase == "Failed":
        kopf.warn(body, reason="ModelCacheFailed", message=f"{after.reason}: {after.message}"[:1000])
    elif after.phase == "Ready":
        kopf.info(body, reason="ModelCacheReady", message=f"{after.claim_name}: {after.message}")
    elif after.phase == "Filling":
        kopf.info(body, reason="ModelCacheFilling", message=f"{after.job_name} fills {after.claim_name}")


def _dump(cache: status_models.ModelCacheStatus) -> dict[str, Any]:
    return cache.model_dump(mode="json", by_alias=True, exclude_none=True)


def status_patch(cache: status_models.ModelCacheStatus) -> dict[str, Any]:
    """status.modelCache for a merge patch: unset fields as nulls, so a stale reason or count goes away."""
    return cache.model_dump(mode="json", by_alias=True)


def _refresh(namespace: str, owner: str, *, memo: kopf.Memo) -> None:
    """Re-read the fill Job; write bytes done, and on a phase change reconcile (the pods may start now)."""
    from fleetlm_operator.handlers import reconcile  # noqa: PLC0415  (reconcile imports this module)

    ctx = context.get(memo)
    stored = ctx.applier.read_llmservice(owner, namespace)
    if stored is None or (stored.get("metadata") or {}).get("deletionTimestamp"):
        return  # going away: its Job goes by garbage collection and must not be made again
    try:
        svc = models.load_stored(reconcile.plain_body(stored))
    except ValueError:
        return  # the spec handler reports invalid objects
    if not svc.spec.model.cached:
        return
    before = stored_cache(stored)
    job = read_job(client.BatchV1Api(ctx.api_client), model_cache.job_name(svc), namespace)
    after = model_cache.cache_status(svc, job)
    if before is not None and _dump(before) == _dump(after):
        return
    if before is None or before.phase != after.phase:
        status = reconcile.reconcile(context.as_body(stored), ctx=ctx, logger=logger, cause="model-cache")
        for _ in range(3):  # the tuner moved the limits since the read: reconcile the fresh object
            if reconcile.write_tuning(stored, status.pop("tuning"), ctx=ctx):
                break
            stored = ctx.applier.read_llmservice(owner, namespace)
            if stored is None:
                return
            status = reconcile.reconcile(context.as_body(stored), ctx=ctx, logger=logger, cause="model-cache")
        else:
            raise kopf.TemporaryError("status.tuning kept changing during the reconcile")
        # Conditions go by server-side apply as their writer, never in a merge patch of the whole list.
        reconcile.apply_conditions(stored, status.pop("conditions"), ctx=ctx, only_if_changed=False)
    else:  # progress only: the bytes, nothing else changes
        status = {"modelCache": status_patch(after)}
    ctx.applier.patch_llmservice_status(owner, namespace, status)


_pending: set[tuple[str, str]] = set()
_tasks: set[asyncio.Task[None]] = set()
DEBOUNCE_S = 0.5


@kopf.on.event(
    "batch",
    "v1",
    "jobs",
    labels={names.LABEL_MANAGED_BY: names.MANAGED_BY, names.LABEL_COMPONENT: names.COMPONENT_MODEL_CACHE},
)
async def on_job_event(meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    namespace, owner = meta.namespace, meta.labels.get(names.LABEL_LLMSERVICE)
    if not namespace or not owner or (namespace, owner) in _pending:
        return
    _pending.add((namespace, owner))

    async def refresh_later() -> None:
        await asyncio.sleep(DEBOUNCE_S)
        _pending.discard((namespace, owner))
        try:
            await asyncio.to_thread(_refresh, namespace, owner, memo=memo)
        except kopf.TemporaryError as error:  # still starting, or no longer the leader: nothing to refresh
            logger.info("model cache refresh of %s/%s skipped: %s", namespace, owner, error)
        except Exception:  # the next Job event retries; never kill the watch
            logger.exception("model cache refresh of %s/%s failed", namespace, owner)

    task = asyncio.create_task(refresh_later())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
