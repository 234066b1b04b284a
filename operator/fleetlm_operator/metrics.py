"""The operator's own Prometheus metrics (reconciles, errors, tuning decisions, leadership).

A private registry, served by the operator on its metrics port; label values are bounded (kind of
object, action, result), never object names of unbounded count.
"""

from __future__ import annotations

import prometheus_client

REGISTRY = prometheus_client.CollectorRegistry(auto_describe=True)

RECONCILES = prometheus_client.Counter(
    "fleetlm_operator_reconciles", "LLMService reconciliations by result.", ["result"], registry=REGISTRY
)
RECONCILE_SECONDS = prometheus_client.Histogram(
    "fleetlm_operator_reconcile_duration_seconds",
    "Time to reconcile one LLMService.",
    registry=REGISTRY,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
CHILDREN_APPLIED = prometheus_client.Counter(
    "fleetlm_operator_children_applied",
    "Child objects applied (server-side apply) by kind.",
    ["kind"],
    registry=REGISTRY,
)
DECISIONS = prometheus_client.Counter(
    "fleetlm_operator_tuning_decisions",
    "Tuning decisions taken, by action; mode=advise: recorded, not applied.",
    ["action", "mode"],
    registry=REGISTRY,
)
MANAGED_SERVICES = prometheus_client.Gauge(
    "fleetlm_operator_llmservices", "LLMService objects this operator currently manages.", registry=REGISTRY
)
IS_LEADER = prometheus_client.Gauge(
    "fleetlm_operator_leader", "1 while this replica holds the leader lease.", registry=REGISTRY
)


def serve(port: int) -> None:
    """Start the /metrics HTTP server in a daemon thread (prometheus-client's own server)."""
    prometheus_client.start_http_server(port, registry=REGISTRY)


# Per-LLMService series (bounded by the number of services) so a dashboard can draw targets and limits
# next to the runtime's latency histograms.
SERVICE_REPLICAS = prometheus_client.Gauge(
    "fleetlm_operator_llmservice_replicas",
    "Runtime replicas of an LLMService, desired and ready.",
    ["namespace", "llmservice", "state"],
    registry=REGISTRY,
)
SERVICE_SLO_TARGET = prometheus_client.Gauge(
    "fleetlm_operator_llmservice_slo_target_seconds",
    "Latency target of an LLMService's SLO (ttft, tpot).",
    ["namespace", "llmservice", "slo"],
    registry=REGISTRY,
)
SERVICE_BATCH_LIMIT = prometheus_client.Gauge(
    "fleetlm_operator_llmservice_batch_limit",
    "Batch limits currently applied (max_batch_size, max_batch_tokens).",
    ["namespace", "llmservice", "limit"],
    registry=REGISTRY,
)

_PER_SERVICE = (SERVICE_REPLICAS, SERVICE_SLO_TARGET, SERVICE_BATCH_LIMIT)


def forget_service(namespace: str, name: str) -> None:
    """Drop every per-service series of a deleted LLMService."""
    for gauge in _PER_SERVICE:
        for labels in [key for key in gauge._metrics if key[:2] == (namespace, name)]:
            gauge.remove(*labels)
