"""A tuning change rewrites the ConfigMap but leaves the pod template, and its config hash, unchanged.

So does a change of what the operator pushes to running runtimes: batch bounds, QoS classes (added, removed,
reweighted, reprioritised), the default class, class headers and SLO targets. A change that needs new pods
(image, model, resources, caching, the API-keys Secret reference) changes the hash, so the Deployment rolls.
The push body is cut from the same rendered config as the ConfigMap, and holds only fields the runtime's
admin API takes live.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from fleetlm_operator.act import push
from fleetlm_operator.api import models, names, status_models
from fleetlm_operator.builders import configmap, deployment
from fleetlm_runtime import config
from fleetlm_runtime.server import admin

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
    tuned = status_models.TuningStatus(
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
        ("qos.classes", [{"name": "critical", "priority": 0}]),  # a class removed
        ("qos.classes", [*BASE_SPEC["qos"]["classes"], {"name": "standard", "priority": 5}]),  # one added
        ("qos.classes", [{"name": "critical", "priority": 0, "weight": 7}, BASE_SPEC["qos"]["classes"][1]]),
        (
            "qos.classes",
            [{"name": "critical", "priority": 0, "slo": {"ttft": "200ms"}}, BASE_SPEC["qos"]["classes"][1]],
        ),
        ("qos.allowHeaderClass", True),
        ("slo", {"ttft": "2s", "tpot": "80ms", "percentile": 99, "window": "1m"}),
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
        ("qos.priorityAging", "1m"),  # the engine's scheduler reads it at start
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


def test_an_api_keys_secret_reference_change_rolls_the_pods() -> None:
    with_keys = changed("qos.apiKeysSecretRef", {"name": "keys", "key": "keys.yaml"})
    other_key = changed("qos.apiKeysSecretRef", {"name": "keys", "key": "other.yaml"})
    assert len({config_hash(BASE_SPEC), config_hash(with_keys), config_hash(other_key)}) == 3


def test_the_push_is_the_live_part_of_the_config_map_and_only_fields_the_runtime_takes_live() -> None:
    spec = changed("qos.classes", [{"name": "critical", "priority": 0, "weight": 3, "slo": {"ttft": "200ms"}},
                                   {"name": "batch", "priority": 9, "sheddable": True}])  # fmt: skip
    tuned = status_models.TuningStatus(max_batch_size=48, max_batch_tokens=6144, shed_classes=["batch"])
    rendered = configmap.runtime_config(service(spec).spec, tuning=tuned)
    body = push.live_body(rendered)
    assert body["batching"] == {"maxBatchSize": 48, "maxBatchTokens": 6144}
    assert body["qos"]["classes"] == rendered["qos"]["classes"]
    critical = body["qos"]["classes"][0]
    assert critical["weight"] == 3 and critical["ttftTargetS"] == 0.2 and critical["tpotTargetS"] == 0.05
    assert body["qos"]["defaultClass"] == "critical" and body["qos"]["shedClasses"] == ["batch"]
    pushed = {f"{section}.{name}" for section, fields in body.items() for name in fields}
    assert pushed <= set(admin.live_field_paths()), pushed - set(admin.live_field_paths())
    # The runtime accepts it whole: the config in force with the pushed fields merged validates.
    merged = configmap.runtime_config(service(BASE_SPEC).spec)
    merged["batching"].update(body["batching"])
    merged["qos"].update(body["qos"])
    assert config.parse_config(merged).qos.by_name()["critical"].weight == 3
    assert push.digest(body) == push.digest(dict(reversed(list(body.items()))))
    assert push.digest(body) != push.digest(push.live_body(configmap.runtime_config(service(BASE_SPEC).spec)))
