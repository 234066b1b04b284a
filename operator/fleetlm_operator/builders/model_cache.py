"""The model cache of an LLMService: its claim, the Job that fills it, and what its state is.

This module decides the objects `spec.model.cache` needs: a PersistentVolumeClaim; a Job that runs
`python -m fleetlm_runtime.models.fill` once (retryable failures retried up to `fill.retries` with the
Job's back-off, permanent ones failing the Job at once through its pod failure policy, the whole fill
bounded by `fill.timeout`); and a ServiceAccount with a Role that lets the fill patch its own Job's
progress annotation and nothing else. It also decides, purely from the Job as the API server returns
it, the cache's phase (`cache_status`), whether runtime pods may run (`pods_allowed`), where the
runtime finds the weights, and how long a replica may take to load them (`startup_budget_s`).

It never talks to a cluster and never adds owner references: the handler adopts the Job, the account
and the Role, and adopts the claim only when `whenDeleted` is Delete.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

from fleetlm_operator.api import fields, models, names, spec_models, status_models
from fleetlm_operator.builders import meta
from fleetlm_runtime import config

CACHE_MOUNT = "/mnt/model-cache"  # where the claim is mounted: read-write in the Job, read-only in replicas
SOURCE_MOUNT = "/mnt/model-source"  # where a pvc:// source's claim is mounted in the Job, read-only
FILL_CONTAINER = "fill"
FILL_EXIT_PERMANENT = 2  # fleetlm_runtime.models.fill.EXIT_PERMANENT: the Job fails without retrying

# Start-up budget of a replica: reading the weights at a conservative bandwidth (a network volume, then
# host-to-device copies) plus a fixed margin for the process, the tokenizer and warm-up. Bounded: a
# floor so small models still get time on a slow node, a ceiling so a hung load is noticed in an hour.
LOAD_BYTES_PER_S = 50 * (1 << 20)
STARTUP_MARGIN_S = 60
STARTUP_MIN_S = 120
STARTUP_MAX_S = 3600
STARTUP_UNKNOWN_S = 1800  # no size known (hub id or path without a cache): the old fixed budget


def _key(*parts: str | None) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def content_dir(spec: spec_models.ModelSpec) -> str:
    """The cache's subdirectory for this source and revision: a new source fills a new directory, so
    pods still running the old one keep their files until the new one is complete."""
    return f"model-{_key(spec.source, spec.revision)[:12]}"


def claim_name(svc: models.LLMService) -> str:
    return f"{svc.name}-model-cache"


def job_name(svc: models.LLMService) -> str:
    """One Job per source and revision (a Job's template is immutable); at most 63 characters."""
    return f"{svc.name[:46]}-cache-{_key(svc.name, svc.spec.model.source, svc.spec.model.revision)[:8]}"


def account_name(svc: models.LLMService) -> str:
    return f"{svc.name}-model-cache"


def labels(svc: models.LLMService) -> dict[str, str]:
    """The standard labels, with the component changed so that no runtime selector matches the fill pod."""
    return {**meta.labels(svc), names.LABEL_COMPONENT: names.COMPONENT_MODEL_CACHE}


def _object_meta(svc: models.LLMService, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": svc.namespace, "labels": labels(svc)}


def runtime_model_path(spec: spec_models.ModelSpec) -> str:
    """What the runtime is told to load: the filled directory when cached, else the source as before."""
    if spec.cached:
        return f"{CACHE_MOUNT}/{content_dir(spec)}"
    return meta.runtime_model_path(spec.source)


def served_model_name(spec: spec_models.ModelSpec) -> str:
    """The id clients send: the one the uncached source would have had (a cache path is no name)."""
    source = meta.runtime_model_path(spec.source)
    return source.rstrip("/").rsplit("/", 1)[-1] if source.startswith("/") else source


# ----------------------------------------------------------------------------------------------------
# Objects


def _cache(svc: models.LLMService) -> spec_models.ModelCacheSpec:
    cache = svc.spec.model.cache
    if cache is None or not cache.enabled:
        raise ValueError(f"{svc.name} has no enabled spec.model.cache")
    return cache


def build_claim(svc: models.LLMService) -> dict[str, Any]:
    cache = _cache(svc)
    spec: dict[str, Any] = {
        "accessModes": [cache.access_mode],
        "resources": {"requests": {"storage": str(cache.size)}},
        "volumeMode": "Filesystem",
    }
    if cache.storage_class_name is not None:
        spec["storageClassName"] = cache.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _object_meta(svc, claim_name(svc)),
            "spec": spec}  # fmt: skip


def build_service_account(svc: models.LLMService) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _object_meta(svc, account_name(svc)),
        "automountServiceAccountToken": False,  # only the fill pod mounts its token, by its own spec
    }


def build_role(svc: models.LLMService) -> dict[str, Any]:
    """May read and patch the current fill Job (its progress annotation), nothing else."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _object_meta(svc, account_name(svc)),
        "rules": [{"apiGroups": ["batch"], "resources": ["jobs"], "resourceNames": [job_name(svc)],
                   "verbs": ["get", "patch"]}],
    }  # fmt: skip


def build_role_binding(svc: models.LLMService) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _object_meta(svc, account_name(svc)),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account_name(svc)},
        "subjects": [{"kind": "ServiceAccount", "name": account_name(svc), "namespace": svc.namespace}],
    }


def _fill_source(source: str) -> str:
    """The fill's --source: a pvc:// source's path under SOURCE_MOUNT, an image path as is, a hub id bare."""
    if source.startswith("pvc://"):
        _claim, _, path = source.removeprefix("pvc://").partition("/")
        return f"{SOURCE_MOUNT}/{path}".rstrip("/")
    return source.removeprefix("hf://")


def build_job(svc: models.LLMService, *, default_image: str) -> dict[str, Any]:
    """The fill Job; created once per source and revision, never updated (a Job's template is immutable)."""
    cache = _cache(svc)
    model = svc.spec.model
    timeout_s = max(1, math.ceil(fields.parse_duration_s(cache.fill.timeout)))
    command = [
        "python", "-m", "fleetlm_runtime.models.fill",
        "--source", _fill_source(model.source),
        "--dest", f"{CACHE_MOUNT}/{content_dir(model)}",
        "--timeout", str(timeout_s),
        "--retries", str(cache.fill.retries),
        "--report-job", job_name(svc),
    ]  # fmt: skip
    if model.revision is not None:
        command += ["--revision", model.revision]
    env: list[dict[str, Any]] = [
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/huggingface"},
    ]
    if not meta.is_hub_id(model.source):
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    if cache.fill.hub_token_secret_ref is not None:
        ref = cache.fill.hub_token_secret_ref
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    volumes: list[dict[str, Any]] = [
        {"name": "model-cache", "persistentVolumeClaim": {"claimName": claim_name(svc)}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "model-cache", "mountPath": CACHE_MOUNT},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    source_claim = meta.pvc_claim(model.source)
    if source_claim is not None:
        volumes.append({"name": "model-source", "persistentVolumeClaim": {"claimName": source_claim,
                                                                          "readOnly": True}})  # fmt: skip
        mounts.append({"name": "model-source", "mountPath": SOURCE_MOUNT, "readOnly": True})
    container = {
        "name": FILL_CONTAINER,
        "image": svc.spec.runtime.image or default_image,
        "command": command,
        "env": env,
        "volumeMounts": mounts,
        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}},
        # The fill's last log line says why it failed; the kubelet keeps it as the termination message.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # the Job controller retries with back-off; a pod failure policy needs Never
        "serviceAccountName": account_name(svc),
        "automountServiceAccountToken": True,  # to patch its progress annotation
        "enableServiceLinks": False,
        "containers": [container],
        "volumes": volumes,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if svc.spec.runtime.node_selector:
        # With ReadWriteOnce the fill must land where the replicas will; same placement for both.
        pod_spec["nodeSelector"] = dict(svc.spec.runtime.node_selector)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {**_object_meta(svc, job_name(svc)),
                     "annotations": {names.ANNOTATION_GENERATED_BY: "fleetlm-operator model cache"}},
        "spec": {
            "backoffLimit": cache.fill.retries,
            "activeDeadlineSeconds": timeout_s,
            "podFailurePolicy": {"rules": [
                # Retrying cannot fix a missing source or a small volume: fail the Job at once.
                {"action": "FailJob", "onExitCodes": {"containerName": FILL_CONTAINER, "operator": "In",
                                                      "values": [FILL_EXIT_PERMANENT]}},
                # A drained or preempted node is not the fill's fault: do not count it against the retries.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]},
            "template": {"metadata": {"labels": labels(svc)}, "spec": pod_spec},
        },
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# State


def _job_condition(job: Mapping[str, Any], *types: str) -> Mapping[str, Any] | None:
    conditions: list[Mapping[str, Any]] = (job.get("status") or {}).get("conditions") or []
    for condition in conditions:
        if condition.get("type") in types and condition.get("status") == "True":
            return condition
    return None


def read_progress(job: Mapping[str, Any]) -> dict[str, Any]:
    """The fill's last report from the Job's annotation; {} when absent or unreadable."""
    raw = ((job.get("metadata") or {}).get("annotations") or {}).get(names.ANNOTATION_CACHE_PROGRESS)
    try:
        loaded = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def cache_status(svc: models.LLMService, job: Mapping[str, Any] | None) -> status_models.ModelCacheStatus:
    """The cache's phase from its fill Job (None: not created yet) and the fill's own progress report."""

    def status(
        phase: status_models.CachePhase, reason: str, message: str, *, done: int | None = None, total: int | None = None
    ) -> status_models.ModelCacheStatus:
        return status_models.ModelCacheStatus(
            phase=phase, reason=reason, message=message, bytes_done=done, bytes_total=total,
            claim_name=claim_name(svc), job_name=job_name(svc),
        )  # fmt: skip

    if job is None:
        return status("Pending", "JobNotCreated", "creating the fill Job")
    progress = read_progress(job)
    done, total = _count(progress.get("bytesDone")), _count(progress.get("bytesTotal"))
    if _job_condition(job, "Complete", "SuccessCriteriaMet") is not None:
        message = f"filled: {total} bytes" if total is not None else "filled"
        return status("Ready", "Filled", message, done=done, total=total)
    failed = _job_condition(job, "Failed", "FailureTarget")
    if failed is not None:
        # The fill's own reason (SourceNotFound, VolumeTooSmall...) says more than the Job's
        # (PodFailurePolicy, BackoffLimitExceeded); the Job's wins when the fill never reported one.
        job_reason = str(failed.get("reason") or "JobFailed")
        reason = str(progress.get("reason") or job_reason) if progress.get("phase") == "Failed" else job_reason
        message = str(progress.get("message") or "") if progress.get("phase") == "Failed" else ""
        message = "; ".join(part for part in (message, f"Job {job_reason}: {failed.get('message', '')}") if part)
        return status("Failed", reason[:128], message[:4096], done=done, total=total)
    job_status = job.get("status") or {}
    attempts_failed = int(job_status.get("failed") or 0)
    if progress.get("phase") == "Failed" or (attempts_failed and not progress):
        why = str(progress.get("reason") or "AttemptFailed")
        message = f"attempt {attempts_failed} failed ({why}: {progress.get('message', '')}); the Job retries"
        return status("Filling", "Retrying", message, done=done, total=total)
    # An active pod may still wait for its node, image or volume: only a report or a running (ready) pod fills.
    if progress.get("phase") in ("Filling", "Ready") or int(job_status.get("ready") or 0) > 0:
        message = f"{done} of {total} bytes" if done is not None and total is not None else "the fill Job runs"
        return status("Filling", "Filling", message, done=done, total=total)
    waiting = int(job_status.get("active") or 0)
    return status("Pending", "JobPending", f"the fill Job's pod is not running yet ({waiting} waiting)")


def pods_allowed(spec: spec_models.LLMServiceSpec, cache: status_models.ModelCacheStatus | None) -> bool:
    """Whether runtime pods may be created or changed: always without a cache, else only once it is Ready.

    The reconcile handler holds the Deployment back while this is False; a tuner that scales must ask
    it too (and change nothing while it is False), so that no replica starts on a missing checkpoint.
    """
    return not spec.model.cached or (cache is not None and cache.phase == "Ready")


def model_bytes(spec: spec_models.LLMServiceSpec, cache: status_models.ModelCacheStatus | None) -> int | None:
    """The checkpoint's size as far as it is known: the fill's count, else the claim's size (an upper bound)."""
    if not spec.model.cached or spec.model.cache is None:
        return None
    if cache is not None and cache.bytes_total:
        return cache.bytes_total
    return config.parse_bytes(spec.model.cache.size)


def startup_budget_s(num_bytes: int | None) -> int:
    """Seconds a replica may take from start to /ready: bytes / LOAD_BYTES_PER_S + margin, bounded."""
    if num_bytes is None:
        return STARTUP_UNKNOWN_S
    wanted = STARTUP_MARGIN_S + math.ceil(num_bytes / LOAD_BYTES_PER_S)
    return max(STARTUP_MIN_S, min(STARTUP_MAX_S, wanted))
