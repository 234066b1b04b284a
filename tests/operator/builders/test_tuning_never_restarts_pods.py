"""A tuning change rewrites the ConfigMap but leaves the pod template, and its config hash, unchanged.

A change that needs new pods (image, model, resources, caching, QoS classes) changes the hash, so the
Deployment rolls.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from fleetlm_operator.api import models, names
from fleetlm_operator.builders import configmap, deployment

IMAGE = "ghcr.io/fleetlm/runtime:1"

BASE_SPEC: dict[str, Any] = {
    "model": {"source": "Qwen/Qwen2.5-0.5B-Instruct"},
    "runtime": {"gpus": 1},
    "replicas": {"min": 1, "max": 4},
    "slo": {"ttft": "500ms", "tpot": "50ms"},
    "qos": {
        "classes": [
            {"name": "critical", "priority": 0, "weight": 2},
            {"name": "batch", "priority": 9, "sheddable": True},
        ],
        "defaultClass": "critical",
    },
    "batching": {"maxBatchSize": 32, "maxBatchTokens": 4096},
}


def service(spec: dict[str, Any]) -> models.LLMService:
    return models.LLMService.model_validate({"metadata": {"name": "chat", "namespace": "ml"}, "spec": spec})


def changed(path: str, value: Any) -> dict[str, Any]:
    spec = copy.deepcopy(BASE_SPEC)
    *parents, last = path.split(".")
    node: Any = spec
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return spec


def template(spec: dict[str, Any], *, image: str = IMAGE) -> dict[str, Any]:
    rendered: dict[str, Any] = deployment.build_deployment(service(spec), default_image=image)["spec"]["template"]
    return rendered


def config_hash(spec: dict[str, Any], *, image: str = IMAGE) -> str:
    value: str = template(spec, image=image)["metadata"]["annotations"][names.ANNOTATION_CONFIG_HASH]
    return value


def test_tuning_changes_the_config_map_but_not_the_pod_template() -> None:
    svc = service(BASE_SPEC)
    tuned = models.Tuning(
        max_batch_size=48, max_batch_tokens=6144, shed_classes=["batch"], class_weights={"critical": 6}
    )
    before = configmap.build_config_map(svc)
    after = configmap.build_config_map(svc, tuning=tuned)
    assert before["data"] != after["data"]
    # The pod template depends on the spec alone: no tuning input exists, and the hash ignores it.
    assert deployment.build_deployment(svc, default_image=IMAGE) == deployment.build_deployment(
        service(copy.deepcopy(BASE_SPEC)), default_image=IMAGE
    )


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("batching.maxBatchSize", 64),
        ("batching.maxBatchTokens", 8192),
        ("batching.autotune", False),
        ("replicas.max", 8),
        ("replicas.desired", 3),
        ("autoscaling.interval", "30s"),
        ("autoscaling.scaleDownStabilization", "10m"),
    ],
)
def test_spec_changes_the_runtime_takes_live_leave_the_pod_template_alone(path: str, value: Any) -> None:
    assert template(changed(path, value)) == template(BASE_SPEC)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("model.source", "Qwen/Qwen2.5-1.5B-Instruct"),
        ("model.revision", "0123abc"),
        ("model.dtype", "float16"),
        ("model.maxContextLength", 4096),
        ("caching.responseCache", {"enabled": True}),
        ("caching.prefixCache", {"enabled": False}),
        ("runtime.gpus", 2),
        ("runtime.env", [{"name": "LOG_LEVEL", "value": "debug"}]),
        ("qos.classes", [{"name": "critical", "priority": 0}]),
    ],
)
def test_changes_that_need_new_pods_change_the_hash(path: str, value: Any) -> None:
    assert config_hash(changed(path, value)) != config_hash(BASE_SPEC)


def test_image_change_alters_the_hash() -> None:
    assert config_hash(BASE_SPEC, image="ghcr.io/fleetlm/runtime:2") != config_hash(BASE_SPEC)
    assert config_hash(changed("runtime.image", "registry.local/runtime:9")) != config_hash(BASE_SPEC)


def test_hash_is_stable_across_calls_and_key_order() -> None:
    reordered = dict(reversed(list(copy.deepcopy(BASE_SPEC).items())))
    assert config_hash(reordered) == config_hash(BASE_SPEC)
    assert len(config_hash(BASE_SPEC)) == 16
