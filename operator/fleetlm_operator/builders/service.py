"""The Service in front of an LLMService's runtime pods, and the endpoint URL it gives.

This module decides how clients inside the cluster reach the OpenAI-compatible API: a ClusterIP
Service on port 80 forwarding to the pods' `http` port. It never talks to a cluster.
"""

from __future__ import annotations

from typing import Any

from fleetlm_operator.api import models
from fleetlm_operator.builders import meta

SERVICE_PORT = 80


def endpoint_url(svc: models.LLMService) -> str:
    """In-cluster base URL, as written to status.endpoint (the OpenAI API lives under /v1)."""
    return f"http://{svc.name}.{svc.namespace}.svc"


def build_service(svc: models.LLMService) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta.object_meta(svc, svc.name),
        "spec": {
            "type": "ClusterIP",
            "selector": meta.selector_labels(svc),
            "ports": [
                {
                    "name": meta.HTTP_PORT_NAME,
                    "port": SERVICE_PORT,
                    "targetPort": meta.HTTP_PORT_NAME,
                    "protocol": "TCP",
                    "appProtocol": "http",
                }
            ],
        },
    }
