"""The runtime's config file (runtime.yaml) and the ConfigMap that carries it.

This module decides what the runtime is told at start: where it listens, where its admin token and
API keys are, model options, batch limits, QoS classes with their effective SLO targets and weights,
and cache settings. The result is validated through the runtime's own `RuntimeConfig` (so a field the
runtime would refuse breaks a test here, not a pod) and written as a camelCase mapping with
`schemaVersion`. Current tuning (from status) wins over the spec's initial values, so a pod that
starts later gets what the running pods were pushed. It never talks to a cluster or a pod.
"""

from __future__ import annotations

from typing import Any

import yaml

from fleetlm_operator.api import fields, models, spec_models, status_models
from fleetlm_operator.builders import meta, model_cache
from fleetlm_operator.policy.spec import DEFAULT_CLASS_NAME  # of requests when none are named
from fleetlm_runtime import config, contract


def _targets(ttft: str | None, tpot: str | None) -> dict[str, float]:
    targets: dict[str, float] = {}
    if ttft is not None:
        targets["ttftTargetS"] = fields.parse_duration_s(ttft)
    if tpot is not None:
        targets["tpotTargetS"] = fields.parse_duration_s(tpot)
    return targets


def _classes(spec: spec_models.LLMServiceSpec, tuning: status_models.TuningStatus) -> list[dict[str, Any]]:
    service_slo = spec.slo
    service_ttft = service_slo.ttft if service_slo is not None else None
    service_tpot = service_slo.tpot if service_slo is not None else None
    if not spec.qos.classes:
        default: dict[str, Any] = {
            "name": DEFAULT_CLASS_NAME,
            "priority": 0,
            "weight": 1,
            "sheddable": False,
            **_targets(service_ttft, service_tpot),
        }
        tuned = tuning.queue_limits.get(DEFAULT_CLASS_NAME)
        if tuned is not None:
            default["queueLimit"] = tuned
        return [default]
    rendered: list[dict[str, Any]] = []
    for qos_class in spec.qos.classes:
        entry: dict[str, Any] = {
            "name": qos_class.name,
            "priority": qos_class.priority,
            "weight": tuning.class_weights.get(qos_class.name, qos_class.weight),
            "sheddable": qos_class.sheddable,
        }
        # The tuner's bound sized in time (status.tuning.queueLimits) within the class's own limit.
        limits = [v for v in (qos_class.queue_limit, tuning.queue_limits.get(qos_class.name)) if v is not None]
        if limits:
            entry["queueLimit"] = min(limits)
        # A class target overrides the service target; the runtime gets the effective ones.
        class_slo = qos_class.slo
        entry.update(
            _targets(
                (class_slo.ttft if class_slo is not None else None) or service_ttft,
                (class_slo.tpot if class_slo is not None else None) or service_tpot,
            )
        )
        rendered.append(entry)
    return rendered


def runtime_config(
    spec: spec_models.LLMServiceSpec, *, tuning: status_models.TuningStatus | None = None
) -> dict[str, Any]:
    """The runtime config as a camelCase mapping, validated by the runtime's RuntimeConfig.

    `tuning` (current limits and weights from status) wins over the spec's initial values.
    Raises `fleetlm_runtime.config.ConfigError` if the runtime would refuse the result.
    """
    current = tuning if tuning is not None else models.initial_tuning(spec)

    model: dict[str, Any] = {"source": model_cache.runtime_model_path(spec.model), "dtype": spec.model.dtype}
    if spec.model.cached:
        model["servedModelName"] = model_cache.served_model_name(spec.model)
    if spec.model.revision is not None:
        model["revision"] = spec.model.revision
    if spec.model.max_context_length is not None:
        model["maxModelLen"] = spec.model.max_context_length

    qos: dict[str, Any] = {
        "classes": _classes(spec, current),
        "defaultClass": spec.qos.default_class or DEFAULT_CLASS_NAME,
        "allowClassHeader": spec.qos.allow_header_class,
    }
    if spec.qos.priority_aging is not None:
        qos["priorityAgingS"] = fields.parse_duration_s(spec.qos.priority_aging)
    if current.shed_classes:
        # Pods that start while the tuner sheds a class must shed it too, not wait for the next push.
        qos["shedClasses"] = list(current.shed_classes)
    if spec.qos.api_keys_secret_ref is not None:
        qos["apiKeysFile"] = f"{meta.API_KEYS_DIR}/{spec.qos.api_keys_secret_ref.key}"

    prefix_cache: dict[str, Any] = {"enabled": spec.caching.prefix_cache.enabled}
    if spec.caching.prefix_cache.max_tokens is not None:
        prefix_cache["maxTokens"] = spec.caching.prefix_cache.max_tokens

    data: dict[str, Any] = {
        contract.CONFIG_SCHEMA_VERSION_KEY: contract.CONFIG_SCHEMA_VERSION,
        "model": model,
        "server": {
            "host": "0.0.0.0",  # the pod's port must be reachable from the kubelet and the Service
            "port": meta.HTTP_PORT,
            "adminTokenFile": f"{meta.ADMIN_DIR}/{meta.ADMIN_TOKEN_KEY}",
            "drainGracePeriodS": meta.DRAIN_GRACE_S,
            "logFormat": "json",
        },
        "batching": {
            "maxBatchSize": current.max_batch_size or spec.batching.max_batch_size,
            "maxBatchTokens": current.max_batch_tokens or spec.batching.max_batch_tokens,
        },
        "qos": qos,
        "caching": {
            "prefixCache": prefix_cache,
            "responseCache": {
                "enabled": spec.caching.response_cache.enabled,
                "maxEntries": spec.caching.response_cache.max_entries,
                "ttlS": fields.parse_duration_s(spec.caching.response_cache.ttl),
            },
        },
    }
    kv_cache: dict[str, Any] = {
        "gpuMemoryUtilization": spec.kv_cache.gpu_memory_utilization,
        "blockSize": spec.kv_cache.block_size,
    }
    if spec.kv_cache.memory is not None:
        kv_cache["memory"] = spec.kv_cache.memory
    data["kvCache"] = kv_cache
    config.parse_config(data)  # the runtime's own validation; raises ConfigError naming the field
    return data


def render_runtime_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def build_config_map(svc: models.LLMService, *, tuning: status_models.TuningStatus | None = None) -> dict[str, Any]:
    """The ConfigMap mounted at /etc/fleetlm/config. Changing its content alone never restarts pods."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta.object_meta(svc, meta.config_map_name(svc)),
        "data": {meta.CONFIG_KEY: render_runtime_yaml(runtime_config(svc.spec, tuning=tuning))},
    }
