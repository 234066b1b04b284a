"""The PodDisruptionBudget of an LLMService's runtime pods.

This module decides how many runtime pods voluntary disruptions (node drains, upgrades) may take at
once: one, so a drain never empties a multi-replica service and never blocks forever on a
single-replica one. Pods that are not ready may always be evicted, so a stuck pod cannot block a
drain. It never talks to a cluster.
"""

from __future__ import annotations

from typing import Any

from fleetlm_operator.api import models
from fleetlm_operator.builders import meta


def build_pod_disruption_budget(svc: models.LLMService) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta.object_meta(svc, svc.name),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": meta.selector_labels(svc)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }
