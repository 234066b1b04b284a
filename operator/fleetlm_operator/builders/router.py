"""The router in front of an LLMService's runtime pods: Deployment, Service, ServiceAccount, Role, RoleBinding.

This module decides the router pod (command and flags from `spec.router`, probes on /health and /ready,
the runtime ConfigMap and API-key Secret mounted so the router applies the same class rules as the
pods) and its least privilege: list/watch the EndpointSlices of its namespace (a Role cannot name
slices by the Service's label, and slice names are generated), and get/patch only this LLMService's
`/scale` subresource and object (the scale-from-zero request and the last-request annotation). Router
pods carry `component: router`, so the runtime selector, Service, PDB and ServiceMonitor never pick them.
It never talks to a cluster and never adds owner references.
"""

from __future__ import annotations

from typing import Any

from fleetlm_operator.api import fields, models, names
from fleetlm_operator.builders import meta

COMPONENT_ROUTER = "router"
ROUTER_PORT = 8080
SERVICE_PORT = 80
CONTAINER_NAME = "router"
RUN_AS_USER = 1000
SHUTDOWN_TIMEOUT_S = 30  # open streams get this long after SIGTERM
PRE_STOP_SLEEP_S = 5  # keep serving while the router's endpoint removal propagates


def router_name(svc: models.LLMService) -> str:
    return f"{svc.name}-router"


def selector_labels(svc: models.LLMService) -> dict[str, str]:
    return {
        names.LABEL_NAME: names.APP_NAME,
        names.LABEL_INSTANCE: svc.name,
        names.LABEL_COMPONENT: COMPONENT_ROUTER,
    }


def labels(svc: models.LLMService) -> dict[str, str]:
    return {**meta.labels(svc), **selector_labels(svc)}


def _meta(svc: models.LLMService) -> dict[str, Any]:
    return {"name": router_name(svc), "namespace": svc.namespace, "labels": labels(svc)}


def endpoint_url(svc: models.LLMService) -> str:
    """In-cluster base URL of the router (status.endpoint when the router is enabled)."""
    return f"http://{router_name(svc)}.{svc.namespace}.svc"


def router_command(svc: models.LLMService) -> list[str]:
    router = svc.spec.router
    hold_timeout_s = fields.parse_duration_s(router.hold.timeout)
    command = [
        "fleetlm-router",
        "--host", "0.0.0.0",
        "--port", str(ROUTER_PORT),
        "--service", svc.name,
        "--namespace", svc.namespace,
        "--port-name", meta.HTTP_PORT_NAME,
        "--llmservice", svc.name,
        "--runtime-config", f"{meta.CONFIG_DIR}/{meta.CONFIG_KEY}",
        "--policy", router.policy,
        "--prefix-tokens", str(router.prefix_tokens),
        "--load-factor", f"{router.load_factor:g}",
        "--hold-max-requests", str(router.hold.max_requests),
        "--hold-timeout", f"{hold_timeout_s:g}",
        "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S),
    ]  # fmt: skip
    if svc.spec.replicas.idle_timeout is not None:
        # Stamps at a quarter of the timeout (at most every 30 s), so traffic never looks idle to the operator.
        activity_s = min(30.0, fields.parse_duration_s(svc.spec.replicas.idle_timeout) / 4)
        command += ["--activity-interval", f"{activity_s:g}"]
    if svc.spec.qos.api_keys_secret_ref is not None:
        command += ["--api-keys-file", f"{meta.API_KEYS_DIR}/{svc.spec.qos.api_keys_secret_ref.key}"]
    return command


def _probe(path: str, *, period_s: int, failure_threshold: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period_s, "timeoutSeconds": 2,
            "failureThreshold": failure_threshold}  # fmt: skip


def build_deployment(svc: models.LLMService, *, default_image: str) -> dict[str, Any]:
    router = svc.spec.router
    volumes: list[dict[str, Any]] = [{"name": "config", "configMap": {"name": meta.config_map_name(svc)}}]
    mounts: list[dict[str, Any]] = [{"name": "config", "mountPath": meta.CONFIG_DIR, "readOnly": True}]
    if svc.spec.qos.api_keys_secret_ref is not None:
        volumes.append(
            {"name": "api-keys", "secret": {"secretName": svc.spec.qos.api_keys_secret_ref.name, "defaultMode": 0o440}}
        )
        mounts.append({"name": "api-keys", "mountPath": meta.API_KEYS_DIR, "readOnly": True})
    resources: dict[str, Any] = {}
    requests = router.resources.requests.model_dump(mode="json", exclude_none=True)
    limits = router.resources.limits.model_dump(mode="json", exclude_none=True)
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    container = {
        "name": CONTAINER_NAME,
        "image": router.image or default_image,
        "command": router_command(svc),
        "ports": [{"name": "http", "containerPort": ROUTER_PORT, "protocol": "TCP"}],
        "resources": resources,
        "volumeMounts": mounts,
        "livenessProbe": _probe(meta.HEALTH_PATH, period_s=10, failure_threshold=3),
        "readinessProbe": _probe(meta.READY_PATH, period_s=2, failure_threshold=2),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRE_STOP_SLEEP_S}}},
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}},
    }  # fmt: skip
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(svc),
        "spec": {
            "replicas": router.replicas,
            "selector": {"matchLabels": selector_labels(svc)},
            "template": {
                "metadata": {"labels": labels(svc)},
                "spec": {
                    "serviceAccountName": router_name(svc),
                    "containers": [container],
                    "volumes": volumes,
                    "terminationGracePeriodSeconds": SHUTDOWN_TIMEOUT_S + PRE_STOP_SLEEP_S + 5,
                    "enableServiceLinks": False,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                },
            },
        },
    }  # fmt: skip


def build_service(svc: models.LLMService) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(svc),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(svc),
            "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP",
                       "appProtocol": "http"}],
        },
    }  # fmt: skip


def build_service_account(svc: models.LLMService) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(svc)}


def rules(svc: models.LLMService) -> list[dict[str, Any]]:
    """The router's whole permission set (the operator's ClusterRole must hold each of these to grant it)."""
    return [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [names.GROUP], "resources": [f"{names.PLURAL}/scale"], "resourceNames": [svc.name],
         "verbs": ["get", "patch"]},
        {"apiGroups": [names.GROUP], "resources": [names.PLURAL], "resourceNames": [svc.name], "verbs": ["patch"]},
    ]  # fmt: skip


def build_role(svc: models.LLMService) -> dict[str, Any]:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(svc), "rules": rules(svc)}


def build_role_binding(svc: models.LLMService) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(svc),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": router_name(svc)},
        "subjects": [{"kind": "ServiceAccount", "name": router_name(svc), "namespace": svc.namespace}],
    }


def build_router_children(svc: models.LLMService, *, default_image: str) -> list[dict[str, Any]]:
    """In apply order: identity and permissions before the pods that use them."""
    return [
        build_service_account(svc),
        build_role(svc),
        build_role_binding(svc),
        build_service(svc),
        build_deployment(svc, default_image=default_image),
    ]
