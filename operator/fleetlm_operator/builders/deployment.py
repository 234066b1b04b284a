"""The Deployment that runs an LLMService's runtime pods.

This module decides the pod: image and command, GPU and CPU/memory resources, placement, probes on
/health and /ready, the preStop pause that lets endpoints update before the runtime drains on
SIGTERM, the config/admin-token/API-key mounts, a non-root read-only container, and the
`fleetlm.dev/config-hash` annotation. The hash covers only the spec parts a running pod cannot take
live (model, runtime, caching, the API-key Secret), so a tuning change (batch limits, QoS classes and
their weights, shedding, SLO targets) never restarts pods. It never talks to a cluster and never adds owner
references.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from fleetlm_operator.api import models, names, spec_models
from fleetlm_operator.builders import meta, model_cache
from fleetlm_runtime import contract

GPU_RESOURCE = "nvidia.com/gpu"
RUN_AS_USER = 1000
# Model downloads and loads are slow; a rollout is only "stuck" after this long.
PROGRESS_DEADLINE_S = 1800
# Startup (until /ready: the model is loaded) may take period x failures before the kubelet restarts the
# pod; liveness only starts after it, so a long load is never killed. The budget grows with the model's
# size (model_cache.startup_budget_s).
STARTUP_PERIOD_S = 10


def startup_failure_threshold(model_bytes: int | None) -> int:
    return math.ceil(model_cache.startup_budget_s(model_bytes) / STARTUP_PERIOD_S)


def config_hash(spec: spec_models.LLMServiceSpec, *, image: str) -> str:
    """Hash of every input a running pod cannot take live, so that changing one rolls the pods.

    Left out on purpose, because the operator pushes them to the running runtimes (act/push.py) and none
    of them may restart a pod: spec.batching (batch limits), spec.qos but its API-keys Secret reference
    and its priority aging (the class table with priorities, weights, queue limits and sheddable flags,
    the default class, class headers), spec.slo (its targets reach the runtime inside the class table;
    percentile and window are the operator's own), spec.replicas, spec.autoscaling, and all of status.tuning.
    """
    restart_inputs = {
        "image": image,
        "model": spec.model.model_dump(mode="json"),
        "runtime": spec.runtime.model_dump(mode="json"),
        "kvCache": spec.kv_cache.model_dump(mode="json"),
        "caching": spec.caching.model_dump(mode="json"),
        # The keys file's path in the config is read once at start (the file itself reloads live).
        "apiKeysSecretRef": (
            spec.qos.api_keys_secret_ref.model_dump(mode="json") if spec.qos.api_keys_secret_ref else None
        ),
        "configSchemaVersion": contract.CONFIG_SCHEMA_VERSION,
        # The engine's scheduler reads it at start.
        "priorityAging": spec.qos.priority_aging,
    }
    canonical = json.dumps(restart_inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _model_volumes(svc: models.LLMService) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The volume and mount the weights need, read-only: the model cache's claim, a pvc:// source's, or none."""
    if svc.spec.model.cached:
        volume = {
            "name": "model-cache",
            "persistentVolumeClaim": {"claimName": model_cache.claim_name(svc), "readOnly": True},
        }
        mount = {"name": "model-cache", "mountPath": model_cache.CACHE_MOUNT, "readOnly": True}
        return [volume], [mount]
    claim = meta.pvc_claim(svc.spec.model.source)
    if claim is None:
        return [], []
    volume = {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
    mount = {"name": "model", "mountPath": meta.MODELS_DIR, "readOnly": True}
    return [volume], [mount]


def _env(spec: spec_models.LLMServiceSpec) -> list[dict[str, Any]]:
    builtin: list[dict[str, Any]] = [
        {"name": "HOME", "value": meta.CACHE_DIR},
        {"name": "XDG_CACHE_HOME", "value": meta.CACHE_DIR},
        {"name": "HF_HOME", "value": f"{meta.CACHE_DIR}/huggingface"},
    ]
    if spec.model.cached or not meta.is_hub_id(spec.model.source):
        # Weights are local: never reach out to the hub (and never hang on a pod without network).
        builtin.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    user = [variable.model_dump(mode="json", exclude_none=True) for variable in spec.runtime.env]
    overridden = {variable["name"] for variable in user}
    return [variable for variable in builtin if variable["name"] not in overridden] + user


def _resources(runtime: spec_models.RuntimeSpec) -> dict[str, Any]:
    requests = runtime.resources.requests.model_dump(mode="json", exclude_none=True)
    limits = runtime.resources.limits.model_dump(mode="json", exclude_none=True)
    if runtime.gpus > 0:
        limits[GPU_RESOURCE] = runtime.gpus
    resources: dict[str, Any] = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    return resources


def _tolerations(runtime: spec_models.RuntimeSpec) -> list[dict[str, Any]]:
    tolerations = [toleration.model_dump(mode="json", exclude_none=True) for toleration in runtime.tolerations]
    if runtime.gpus > 0 and not any(toleration.key == GPU_RESOURCE for toleration in runtime.tolerations):
        # GPU nodes are commonly tainted nvidia.com/gpu:NoSchedule to keep other pods off them.
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    return tolerations


def _http_probe(path: str, *, period_s: int, timeout_s: int, failure_threshold: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": meta.HTTP_PORT_NAME},
        "periodSeconds": period_s,
        "timeoutSeconds": timeout_s,
        "failureThreshold": failure_threshold,
    }


def runtime_command(model_argument: str) -> list[str]:
    return [
        "fleetlm-runtime",
        "--model",
        model_argument,
        "--port",
        str(meta.HTTP_PORT),
        "--config",
        f"{meta.CONFIG_DIR}/{meta.CONFIG_KEY}",
        "--admin-token-file",
        f"{meta.ADMIN_DIR}/{meta.ADMIN_TOKEN_KEY}",
    ]


def build_pod_template(svc: models.LLMService, *, default_image: str, model_bytes: int | None = None) -> dict[str, Any]:
    """The pod template: identical for any two specs that differ only in tuning-only fields.

    `model_bytes` (the checkpoint's size, where known) sizes the startup probe.
    """
    spec = svc.spec
    image = spec.runtime.image or default_image
    model_volumes, model_mounts = _model_volumes(svc)

    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": meta.config_map_name(svc)}},
        {
            "name": "admin-token",
            "secret": {"secretName": meta.admin_secret_name(svc), "defaultMode": 0o440},
        },
        {"name": "cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        *model_volumes,
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": meta.CONFIG_DIR, "readOnly": True},
        {"name": "admin-token", "mountPath": meta.ADMIN_DIR, "readOnly": True},
        {"name": "cache", "mountPath": meta.CACHE_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
        *model_mounts,
    ]
    if spec.qos.api_keys_secret_ref is not None:
        volumes.append(
            {
                "name": "api-keys",
                "secret": {"secretName": spec.qos.api_keys_secret_ref.name, "defaultMode": 0o440},
            }
        )
        mounts.append({"name": "api-keys", "mountPath": meta.API_KEYS_DIR, "readOnly": True})
    if spec.runtime.gpus > 0:
        # NCCL and torch use /dev/shm; the container default (64Mi) is too small.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})

    container: dict[str, Any] = {
        "name": meta.CONTAINER_NAME,
        "image": image,
        "command": runtime_command(model_cache.runtime_model_path(spec.model)),
        "ports": [{"name": meta.HTTP_PORT_NAME, "containerPort": meta.HTTP_PORT, "protocol": "TCP"}],
        "env": _env(spec),
        "resources": _resources(spec.runtime),
        "volumeMounts": mounts,
        # /ready, not /health: the port opens before the model loads, so only /ready says the load is done.
        "startupProbe": _http_probe(
            meta.READY_PATH,
            period_s=STARTUP_PERIOD_S,
            timeout_s=5,
            failure_threshold=startup_failure_threshold(model_bytes),
        ),
        "livenessProbe": _http_probe(meta.HEALTH_PATH, period_s=10, timeout_s=5, failure_threshold=3),
        "readinessProbe": _http_probe(meta.READY_PATH, period_s=5, timeout_s=3, failure_threshold=2),
        # Keep serving while the endpoint removal propagates; then SIGTERM makes the runtime drain.
        "lifecycle": {"preStop": {"sleep": {"seconds": meta.PRE_STOP_SLEEP_S}}},
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }

    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": meta.TERMINATION_GRACE_S,
        "automountServiceAccountToken": False,  # the runtime never talks to the API server
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if spec.runtime.node_selector:
        pod_spec["nodeSelector"] = dict(spec.runtime.node_selector)
    tolerations = _tolerations(spec.runtime)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if spec.runtime.priority_class_name is not None:
        pod_spec["priorityClassName"] = spec.runtime.priority_class_name

    return {
        "metadata": {
            "labels": meta.labels(svc),
            "annotations": {
                names.ANNOTATION_CONFIG_HASH: config_hash(spec, image=image),
                "kubectl.kubernetes.io/default-container": meta.CONTAINER_NAME,
            },
        },
        "spec": pod_spec,
    }


def build_deployment(svc: models.LLMService, *, default_image: str, model_bytes: int | None = None) -> dict[str, Any]:
    """The runtime Deployment; `default_image` is used when spec.runtime.image is unset."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta.object_meta(svc, svc.name),
        "spec": {
            "replicas": svc.spec.replicas.effective,
            "selector": {"matchLabels": meta.selector_labels(svc)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}},
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": PROGRESS_DEADLINE_S,
            "template": build_pod_template(svc, default_image=default_image, model_bytes=model_bytes),
        },
    }
