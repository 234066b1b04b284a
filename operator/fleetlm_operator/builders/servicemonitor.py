"""The Prometheus Operator ServiceMonitor that scrapes an LLMService's runtime pods.

This module decides what Prometheus scrapes (the `http` port's /metrics, at the tuning interval).
Whether to create it at all (only where the ServiceMonitor CRD exists) is the caller's decision;
this module never talks to a cluster.
"""

from __future__ import annotations

from typing import Any

from fleetlm_operator.api import models
from fleetlm_operator.builders import meta

SERVICE_MONITOR_CRD = "servicemonitors.monitoring.coreos.com"
API_VERSION = "monitoring.coreos.com/v1"


def build_service_monitor(svc: models.LLMService) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "ServiceMonitor",
        "metadata": meta.object_meta(svc, svc.name),
        "spec": {
            "selector": {"matchLabels": meta.selector_labels(svc)},
            "namespaceSelector": {"matchNames": [svc.namespace]},
            "endpoints": [
                {
                    "port": meta.HTTP_PORT_NAME,
                    "path": meta.METRICS_PATH,
                    "interval": svc.spec.autoscaling.interval,
                }
            ],
        },
    }
