"""Names, labels and in-pod paths shared by every builder.

This module decides what the objects made for one LLMService are called, how they are labelled and
selected, and where the runtime finds its config, admin token and API keys. It computes names from
the LLMService and nothing else; it never talks to a cluster and never adds owner references (the
caller adopts the objects).
"""

from __future__ import annotations

from typing import Any

from fleetlm_operator.api import models, names
from fleetlm_runtime import contract

# The runtime's HTTP port and its name; probes, the Service and the ServiceMonitor use the name.
HTTP_PORT = 8000
HTTP_PORT_NAME = "http"
CONTAINER_NAME = "runtime"

CONFIG_DIR = "/etc/fleetlm/config"
CONFIG_KEY = "runtime.yaml"
ADMIN_DIR = "/etc/fleetlm/admin"
ADMIN_TOKEN_KEY = "token"
API_KEYS_DIR = "/etc/fleetlm/api-keys"
MODELS_DIR = "/mnt/models"  # where a pvc:// source's claim is mounted, read-only
CACHE_DIR = "/var/cache/fleetlm"  # writable: hub downloads, compiled kernels, HOME

HEALTH_PATH = contract.PATH_HEALTH
READY_PATH = contract.PATH_READY
METRICS_PATH = contract.PATH_METRICS

# Pod shutdown: the preStop pause lets endpoint removal propagate, then SIGTERM makes the runtime stop
# admitting and finish in-flight streams within DRAIN_GRACE_S, all inside the termination grace period.
PRE_STOP_SLEEP_S = 5
TERMINATION_GRACE_S = 120
DRAIN_GRACE_S = TERMINATION_GRACE_S - PRE_STOP_SLEEP_S - 5


def runtime_model_path(source: str) -> str:
    """What the runtime is told to load: a pvc:// source becomes its path under MODELS_DIR, hf:// is dropped."""
    if source.startswith("pvc://"):
        _claim, _, path = source.removeprefix("pvc://").partition("/")
        return f"{MODELS_DIR}/{path}".rstrip("/")
    return source.removeprefix("hf://")


def pvc_claim(source: str) -> str | None:
    """The PersistentVolumeClaim a pvc:// source names, else None."""
    if not source.startswith("pvc://"):
        return None
    return source.removeprefix("pvc://").partition("/")[0]


def is_hub_id(source: str) -> bool:
    """Whether the runtime fetches the weights from the Hugging Face hub (needs network)."""
    return not source.startswith(("pvc://", "/", "builtin:"))


def config_map_name(svc: models.LLMService) -> str:
    return f"{svc.name}-config"


def admin_secret_name(svc: models.LLMService) -> str:
    return f"{svc.name}-admin-token"


def selector_labels(svc: models.LLMService) -> dict[str, str]:
    """Labels that select this service's runtime pods; never change them (Deployment selectors are immutable)."""
    return {
        names.LABEL_NAME: names.APP_NAME,
        names.LABEL_INSTANCE: svc.name,
        names.LABEL_COMPONENT: names.COMPONENT_RUNTIME,
    }


def selector_string(svc: models.LLMService) -> str:
    """The selector as `status.selector` and the /scale subresource want it: `k=v,k=v`."""
    return ",".join(f"{key}={value}" for key, value in sorted(selector_labels(svc).items()))


def labels(svc: models.LLMService) -> dict[str, str]:
    """Standard labels on every object (and pod) made for this LLMService."""
    return {
        **selector_labels(svc),
        names.LABEL_PART_OF: names.PART_OF,
        names.LABEL_MANAGED_BY: names.MANAGED_BY,
        names.LABEL_LLMSERVICE: svc.name,
    }


def object_meta(svc: models.LLMService, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": svc.namespace, "labels": labels(svc)}
