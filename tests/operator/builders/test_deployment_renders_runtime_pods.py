"""The Deployment builder renders the runtime pod an LLMService asks for."""

from __future__ import annotations

from typing import Any

import pytest

from fleetlm_operator.api import models, names
from fleetlm_operator.builders import deployment, meta

IMAGE = "ghcr.io/fleetlm/runtime:test"


def make_service(spec: dict[str, Any] | None = None, *, name: str = "chat", namespace: str = "ml") -> models.LLMService:
    return models.LLMService.model_validate(
        {
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec if spec is not None else {"model": {"source": "Qwen/Qwen2.5-0.5B-Instruct"}},
        }
    )


def container_of(rendered: dict[str, Any]) -> dict[str, Any]:
    [container] = rendered["spec"]["template"]["spec"]["containers"]
    return container


def pod_spec_of(rendered: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = rendered["spec"]["template"]["spec"]
    return pod


def test_deployment_identity_labels_and_selector() -> None:
    rendered = deployment.build_deployment(make_service(), default_image=IMAGE)
    assert (rendered["apiVersion"], rendered["kind"]) == ("apps/v1", "Deployment")
    assert rendered["metadata"]["name"] == "chat"
    assert rendered["metadata"]["namespace"] == "ml"
    assert "ownerReferences" not in rendered["metadata"]  # the caller adopts
    labels = rendered["metadata"]["labels"]
    assert labels[names.LABEL_NAME] == "fleetlm"
    assert labels[names.LABEL_INSTANCE] == "chat"
    assert labels[names.LABEL_COMPONENT] == "runtime"
    assert labels[names.LABEL_PART_OF] == "fleetlm"
    assert labels[names.LABEL_MANAGED_BY] == "fleetlm-operator"
    selector = rendered["spec"]["selector"]["matchLabels"]
    assert selector.items() <= rendered["spec"]["template"]["metadata"]["labels"].items()
    assert meta.selector_string(make_service()) == ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def test_command_ports_and_image() -> None:
    container = container_of(deployment.build_deployment(make_service(), default_image=IMAGE))
    assert container["image"] == IMAGE
    assert container["command"] == [
        "fleetlm-runtime",
        "--model",
        "Qwen/Qwen2.5-0.5B-Instruct",
        "--port",
        "8000",
        "--config",
        "/etc/fleetlm/config/runtime.yaml",
        "--admin-token-file",
        "/etc/fleetlm/admin/token",
    ]
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]


def test_spec_image_wins_over_the_operator_default() -> None:
    svc = make_service({"model": {"source": "builtin:tiny"}, "runtime": {"image": "registry.local/runtime:7"}})
    assert container_of(deployment.build_deployment(svc, default_image=IMAGE))["image"] == "registry.local/runtime:7"


def test_gpus_become_nvidia_limits_and_a_toleration() -> None:
    svc = make_service(
        {
            "model": {"source": "org/model"},
            "runtime": {
                "gpus": 2,
                "resources": {"requests": {"cpu": 8, "memory": "32Gi"}, "limits": {"memory": "40Gi"}},
            },
        }
    )
    rendered = deployment.build_deployment(svc, default_image=IMAGE)
    resources = container_of(rendered)["resources"]
    assert resources == {"requests": {"cpu": 8, "memory": "32Gi"}, "limits": {"memory": "40Gi", "nvidia.com/gpu": 2}}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec_of(rendered)[
        "tolerations"
    ]
    assert any(volume["name"] == "dshm" for volume in pod_spec_of(rendered)["volumes"])


def test_cpu_only_has_no_gpu_resources() -> None:
    svc = make_service({"model": {"source": "builtin:tiny"}, "runtime": {"gpus": 0}})
    rendered = deployment.build_deployment(svc, default_image=IMAGE)
    assert "nvidia.com/gpu" not in str(container_of(rendered)["resources"])
    assert "tolerations" not in pod_spec_of(rendered)
    assert not any(volume["name"] == "dshm" for volume in pod_spec_of(rendered)["volumes"])


def test_placement_node_selector_tolerations_priority_class() -> None:
    svc = make_service(
        {
            "model": {"source": "org/model"},
            "runtime": {
                "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "priorityClassName": "llm-high",
            },
        }
    )
    pod = pod_spec_of(deployment.build_deployment(svc, default_image=IMAGE))
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "llm-high"


def test_probes_on_health_and_ready_by_port_name() -> None:
    container = container_of(deployment.build_deployment(make_service(), default_image=IMAGE))
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    # /health answers before the model loads; only /ready says the load is done.
    assert container["startupProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # slow model loads are not crashes


def test_pre_stop_pause_and_grace_period_leave_room_to_drain() -> None:
    rendered = deployment.build_deployment(make_service(), default_image=IMAGE)
    pre_stop = container_of(rendered)["lifecycle"]["preStop"]
    assert pre_stop == {"sleep": {"seconds": meta.PRE_STOP_SLEEP_S}}
    grace = pod_spec_of(rendered)["terminationGracePeriodSeconds"]
    assert grace == meta.TERMINATION_GRACE_S
    assert grace > meta.PRE_STOP_SLEEP_S + meta.DRAIN_GRACE_S


def test_config_admin_token_and_cache_mounts() -> None:
    rendered = deployment.build_deployment(make_service(), default_image=IMAGE)
    mounts = {mount["name"]: mount for mount in container_of(rendered)["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod_spec_of(rendered)["volumes"]}
    assert mounts["config"] == {"name": "config", "mountPath": "/etc/fleetlm/config", "readOnly": True}
    assert volumes["config"]["configMap"]["name"] == "chat-config"
    assert mounts["admin-token"] == {"name": "admin-token", "mountPath": "/etc/fleetlm/admin", "readOnly": True}
    assert volumes["admin-token"]["secret"]["secretName"] == "chat-admin-token"
    assert volumes["cache"] == {"name": "cache", "emptyDir": {}}
    assert mounts["tmp"]["mountPath"] == "/tmp"


def test_non_root_read_only_container() -> None:
    rendered = deployment.build_deployment(make_service(), default_image=IMAGE)
    security = container_of(rendered)["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    pod = pod_spec_of(rendered)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    env = {variable["name"]: variable.get("value") for variable in container_of(rendered)["env"]}
    assert env["HOME"].startswith(meta.CACHE_DIR)  # writable, unlike the root filesystem
    assert env["HF_HOME"].startswith(meta.CACHE_DIR)


def test_pvc_source_is_mounted_read_only_and_passed_as_a_path() -> None:
    svc = make_service({"model": {"source": "pvc://model-weights/meta-llama/Llama-3.1-8B"}})
    rendered = deployment.build_deployment(svc, default_image=IMAGE)
    container = container_of(rendered)
    assert container["command"][2] == "/mnt/models/meta-llama/Llama-3.1-8B"
    volumes = {volume["name"]: volume for volume in pod_spec_of(rendered)["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "model-weights", "readOnly": True}
    assert {"name": "model", "mountPath": "/mnt/models", "readOnly": True} in container["volumeMounts"]
    env = {variable["name"]: variable.get("value") for variable in container["env"]}
    assert env["HF_HUB_OFFLINE"] == "1"  # local weights: never reach for the hub


def test_hub_source_keeps_network_and_drops_the_scheme() -> None:
    svc = make_service({"model": {"source": "hf://Qwen/Qwen2.5-0.5B"}})
    container = container_of(deployment.build_deployment(svc, default_image=IMAGE))
    assert container["command"][2] == "Qwen/Qwen2.5-0.5B"
    assert "HF_HUB_OFFLINE" not in {variable["name"] for variable in container["env"]}


def test_api_keys_secret_is_mounted_when_referenced() -> None:
    svc = make_service(
        {
            "model": {"source": "builtin:tiny"},
            "qos": {
                "classes": [{"name": "standard", "priority": 0}],
                "defaultClass": "standard",
                "apiKeysSecretRef": {"name": "chat-keys"},
            },
        }
    )
    rendered = deployment.build_deployment(svc, default_image=IMAGE)
    volumes = {volume["name"]: volume for volume in pod_spec_of(rendered)["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == "chat-keys"
    assert {"name": "api-keys", "mountPath": meta.API_KEYS_DIR, "readOnly": True} in container_of(rendered)[
        "volumeMounts"
    ]


def test_user_env_wins_over_builtin_env() -> None:
    svc = make_service(
        {
            "model": {"source": "org/model"},
            "runtime": {
                "env": [
                    {"name": "HF_HOME", "value": "/data/hf"},
                    {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
                ]
            },
        }
    )
    env = container_of(deployment.build_deployment(svc, default_image=IMAGE))["env"]
    assert [variable for variable in env if variable["name"] == "HF_HOME"] == [{"name": "HF_HOME", "value": "/data/hf"}]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in env


@pytest.mark.parametrize(
    ("replicas", "expected"),
    [({"min": 2, "max": 4}, 2), ({"min": 1, "max": 4, "desired": 3}, 3)],
)
def test_replicas_come_from_scale_or_min(replicas: dict[str, int], expected: int) -> None:
    svc = make_service({"model": {"source": "builtin:tiny"}, "replicas": replicas})
    assert deployment.build_deployment(svc, default_image=IMAGE)["spec"]["replicas"] == expected


def test_rendering_is_deterministic() -> None:
    assert deployment.build_deployment(make_service(), default_image=IMAGE) == deployment.build_deployment(
        make_service(), default_image=IMAGE
    )
