"""The ConfigMap carries a runtime.yaml that the runtime's own config model accepts."""

from __future__ import annotations

import pathlib
from typing import Any

import yaml

from fleetlm_operator.api import models, status_models
from fleetlm_operator.builders import configmap, meta
from fleetlm_runtime import config, contract


def service(spec: dict[str, Any]) -> models.LLMService:
    return models.LLMService.model_validate({"metadata": {"name": "chat", "namespace": "ml"}, "spec": spec})


MULTICLASS: dict[str, Any] = {
    "model": {"source": "pvc://weights/llama", "dtype": "bfloat16", "maxContextLength": 8192, "revision": "abc"},
    "slo": {"ttft": "1s", "tpot": "60ms"},
    "qos": {
        "classes": [
            {"name": "critical", "priority": 0, "weight": 4, "slo": {"ttft": "300ms"}},
            {"name": "standard", "priority": 10, "weight": 2},
            {"name": "batch", "priority": 100, "sheddable": True, "queueLimit": 64},
        ],
        "defaultClass": "standard",
        "apiKeysSecretRef": {"name": "keys", "key": "keys.yaml"},
        "allowHeaderClass": True,
    },
    "batching": {"maxBatchSize": 64, "maxBatchTokens": 8192},
    "caching": {"prefixCache": {"maxTokens": 100000}, "responseCache": {"enabled": True, "ttl": "2m"}},
}


def runtime_yaml(rendered: dict[str, Any]) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(rendered["data"][meta.CONFIG_KEY])
    return loaded


def test_config_map_identity() -> None:
    rendered = configmap.build_config_map(service(MULTICLASS))
    assert (rendered["apiVersion"], rendered["kind"]) == ("v1", "ConfigMap")
    assert rendered["metadata"]["name"] == "chat-config"
    assert rendered["metadata"]["namespace"] == "ml"
    assert set(rendered["data"]) == {"runtime.yaml"}


def test_runtime_yaml_is_accepted_by_the_runtime() -> None:
    data = runtime_yaml(configmap.build_config_map(service(MULTICLASS)))
    assert data[contract.CONFIG_SCHEMA_VERSION_KEY] == contract.CONFIG_SCHEMA_VERSION
    parsed = config.parse_config(data)
    assert parsed.model.source == "/mnt/models/llama"
    assert parsed.model.max_model_len == 8192
    assert parsed.model.revision == "abc"
    assert parsed.server.host == "0.0.0.0"
    assert parsed.server.port == meta.HTTP_PORT
    assert parsed.server.admin_token_file == "/etc/fleetlm/admin/token"
    assert parsed.server.drain_grace_period_s == meta.DRAIN_GRACE_S
    assert (parsed.batching.max_batch_size, parsed.batching.max_batch_tokens) == (64, 8192)
    assert parsed.qos.default_class == "standard"
    assert parsed.qos.allow_class_header is True
    assert parsed.qos.api_keys_file == "/etc/fleetlm/api-keys/keys.yaml"
    assert parsed.caching.prefix_cache.max_tokens == 100000
    assert parsed.caching.response_cache.enabled is True
    assert parsed.caching.response_cache.ttl_s == 120.0


def test_class_targets_fall_back_to_the_service_slo() -> None:
    parsed = config.parse_config(runtime_yaml(configmap.build_config_map(service(MULTICLASS))))
    classes = parsed.qos.by_name()
    assert (classes["critical"].ttft_target_s, classes["critical"].tpot_target_s) == (0.3, 0.06)
    assert (classes["standard"].ttft_target_s, classes["standard"].tpot_target_s) == (1.0, 0.06)
    assert classes["batch"].sheddable is True
    assert classes["batch"].queue_limit == 64
    assert [qos_class.name for qos_class in parsed.qos.classes] == ["critical", "standard", "batch"]


def test_tuning_wins_over_the_spec() -> None:
    tuning = status_models.TuningStatus(max_batch_size=96, max_batch_tokens=12288, class_weights={"critical": 8})
    parsed = config.parse_config(runtime_yaml(configmap.build_config_map(service(MULTICLASS), tuning=tuning)))
    assert (parsed.batching.max_batch_size, parsed.batching.max_batch_tokens) == (96, 12288)
    classes = parsed.qos.by_name()
    assert classes["critical"].weight == 8
    assert classes["standard"].weight == 2  # untouched by tuning


def test_without_classes_one_default_class_carries_the_service_slo() -> None:
    data = runtime_yaml(
        configmap.build_config_map(service({"model": {"source": "builtin:tiny"}, "slo": {"ttft": "2s"}}))
    )
    parsed = config.parse_config(data)
    [only] = parsed.qos.classes
    assert only.name == parsed.qos.default_class == configmap.DEFAULT_CLASS_NAME
    assert only.ttft_target_s == 2.0
    assert only.tpot_target_s is None
    assert parsed.model.source == "builtin:tiny"


def test_rendering_is_deterministic() -> None:
    assert configmap.build_config_map(service(MULTICLASS)) == configmap.build_config_map(service(MULTICLASS))


def test_shed_classes_reach_pods_that_start_later() -> None:
    example = pathlib.Path(__file__).resolve().parents[3] / "examples" / "llmservice-multiclass.yaml"
    svc = models.LLMService.model_validate(yaml.safe_load(example.read_text()))
    sheddable = [c.name for c in svc.spec.qos.classes if c.sheddable]
    assert sheddable
    tuning = models.initial_tuning(svc.spec).model_copy(update={"shed_classes": sheddable})
    rendered = yaml.safe_load(configmap.build_config_map(svc, tuning=tuning)["data"]["runtime.yaml"])
    assert rendered["qos"]["shedClasses"] == sheddable
    plain = yaml.safe_load(configmap.build_config_map(svc)["data"]["runtime.yaml"])
    assert "shedClasses" not in plain["qos"]


def test_priority_aging_reaches_the_engine_and_defaults_to_the_runtimes() -> None:
    aged = {**MULTICLASS, "qos": {**MULTICLASS["qos"], "priorityAging": "1m30s"}}
    parsed = config.parse_config(runtime_yaml(configmap.build_config_map(service(aged))))
    assert parsed.qos.priority_aging_s == 90.0
    default = config.parse_config(runtime_yaml(configmap.build_config_map(service(MULTICLASS))))
    assert default.qos.priority_aging_s == config.QoSSettings.model_fields["priority_aging_s"].default == 30.0


def test_the_tuners_queue_bound_reaches_the_runtime_within_each_classs_own_limit() -> None:
    # status.tuning.queueLimits (the tuner's bound sized in time) goes out with the class table: the ConfigMap
    # for pods that start later and the live push (`act.push.live_body` cuts the push out of this config).
    tuning = models.initial_tuning(service(MULTICLASS).spec).model_copy(
        update={"queue_limits": {"critical": 5, "batch": 100}}
    )
    parsed = config.parse_config(runtime_yaml(configmap.build_config_map(service(MULTICLASS), tuning=tuning)))
    classes = parsed.qos.by_name()
    assert classes["critical"].queue_limit == 5
    assert classes["standard"].queue_limit is None  # no bound from the tuner, none in the spec
    assert classes["batch"].queue_limit == 64  # the spec's queueLimit caps the tuner's
    plain = {"model": {"source": "builtin:tiny"}, "slo": {"ttft": "2s"}}
    tuned = status_models.TuningStatus(queue_limits={configmap.DEFAULT_CLASS_NAME: 3})
    [only] = config.parse_config(runtime_yaml(configmap.build_config_map(service(plain), tuning=tuned))).qos.classes
    assert only.queue_limit == 3
