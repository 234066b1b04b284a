"""The model cache's objects (claim, fill Job, its RBAC), its state from the Job, the cached pod, the
startup probe sized from the model's bytes, and spec.kvCache in the runtime config."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fleetlm_operator.api import models, names, status_models
from fleetlm_operator.builders import configmap, deployment, meta, model_cache
from fleetlm_operator.status import model_cache as cache_status_mod
from fleetlm_runtime import config
from fleetlm_runtime.models import fill

IMAGE = "ghcr.io/fleetlm/runtime:test"
HUB_ID = "Qwen/Qwen2.5-0.5B-Instruct"


def make_service(model: dict[str, Any] | None = None, **spec: Any) -> models.LLMService:
    model = model if model is not None else {"source": HUB_ID, "cache": {"size": "5Gi"}}
    return models.LLMService.model_validate(
        {"metadata": {"name": "chat", "namespace": "ml"}, "spec": {"model": model, **spec}}
    )


def container_of(rendered: dict[str, Any]) -> dict[str, Any]:
    [container] = rendered["spec"]["template"]["spec"]["containers"]
    return container


def test_claim_asks_for_the_size_class_and_mode() -> None:
    svc = make_service(
        {"source": HUB_ID, "cache": {"size": "20Gi", "storageClassName": "filestore", "accessMode": "ReadWriteOnce"}}
    )
    claim = model_cache.build_claim(svc)
    assert claim["metadata"]["name"] == "chat-model-cache"
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "20Gi"}},
                             "volumeMode": "Filesystem", "storageClassName": "filestore"}  # fmt: skip
    assert "ownerReferences" not in claim["metadata"]  # the handler owns it only with whenDeleted: Delete
    assert model_cache.build_claim(make_service())["spec"]["accessModes"] == ["ReadWriteMany"]


def test_fill_job_bounds_retries_and_time_and_fails_at_once_on_permanent_errors() -> None:
    svc = make_service({"source": HUB_ID, "revision": "abc123",
                        "cache": {"size": "5Gi", "fill": {"timeout": "30m", "retries": 2,
                                                          "hubTokenSecretRef": {"name": "hf"}}}})  # fmt: skip
    job = model_cache.build_job(svc, default_image=IMAGE)
    assert job["spec"]["backoffLimit"] == 2
    assert job["spec"]["activeDeadlineSeconds"] == 1800
    # The operator's exit code for "do not retry" is the fill program's.
    rule, disruption = job["spec"]["podFailurePolicy"]["rules"]
    assert disruption == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    assert rule == {"action": "FailJob", "onExitCodes": {"containerName": "fill", "operator": "In",
                                                         "values": [fill.EXIT_PERMANENT]}}  # fmt: skip
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == model_cache.account_name(svc)
    [container] = pod["containers"]
    assert container["image"] == IMAGE
    dest = f"{model_cache.CACHE_MOUNT}/{model_cache.content_dir(svc.spec.model)}"
    assert container["command"] == [
        "python", "-m", "fleetlm_runtime.models.fill", "--source", HUB_ID, "--dest", dest, "--timeout", "1800",
        "--retries", "2", "--report-job", model_cache.job_name(svc), "--revision", "abc123",
    ]  # fmt: skip
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert "HF_HUB_OFFLINE" not in env  # a hub source needs the network
    assert {"name": "model-cache", "mountPath": model_cache.CACHE_MOUNT} in container["volumeMounts"]
    # The fill pod is not a runtime pod: no runtime selector matches it.
    template_labels = job["spec"]["template"]["metadata"]["labels"]
    assert not meta.selector_labels(svc).items() <= template_labels.items()
    assert template_labels[names.LABEL_LLMSERVICE] == "chat"
    assert len(model_cache.job_name(svc)) <= 63


def test_a_pvc_source_is_mounted_read_only_into_the_fill() -> None:
    svc = make_service({"source": "pvc://weights/llama/8b", "cache": {"size": "20Gi"}})
    job = model_cache.build_job(svc, default_image=IMAGE)
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["command"][container["command"].index("--source") + 1] == f"{model_cache.SOURCE_MOUNT}/llama/8b"
    assert {"name": "model-source", "mountPath": model_cache.SOURCE_MOUNT, "readOnly": True} in container[
        "volumeMounts"
    ]
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model-source"]["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in container["env"]


def test_the_fill_may_patch_its_own_job_and_nothing_else() -> None:
    svc = make_service()
    role = model_cache.build_role(svc)
    assert role["rules"] == [{"apiGroups": ["batch"], "resources": ["jobs"],
                              "resourceNames": [model_cache.job_name(svc)], "verbs": ["get", "patch"]}]  # fmt: skip
    binding = model_cache.build_role_binding(svc)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": model_cache.account_name(svc), "namespace": "ml"}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


def test_a_new_source_gets_a_new_job_and_directory() -> None:
    one = make_service({"source": HUB_ID, "cache": {"size": "5Gi"}})
    two = make_service({"source": HUB_ID, "revision": "v2", "cache": {"size": "5Gi"}})
    assert model_cache.job_name(one) != model_cache.job_name(two)
    assert model_cache.content_dir(one.spec.model) != model_cache.content_dir(two.spec.model)
    assert model_cache.claim_name(one) == model_cache.claim_name(two)


def test_cached_replicas_mount_the_claim_read_only_and_load_from_it() -> None:
    svc = make_service()
    rendered = deployment.build_deployment(svc, default_image=IMAGE)
    container = container_of(rendered)
    path = f"{model_cache.CACHE_MOUNT}/{model_cache.content_dir(svc.spec.model)}"
    assert container["command"][container["command"].index("--model") + 1] == path
    assert {"name": "model-cache", "mountPath": model_cache.CACHE_MOUNT, "readOnly": True} in container["volumeMounts"]
    volumes = {v["name"]: v for v in rendered["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"] == {"claimName": "chat-model-cache", "readOnly": True}
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in container["env"]  # never downloads again
    model = configmap.runtime_config(svc.spec)["model"]
    assert model["source"] == path
    assert model["servedModelName"] == HUB_ID  # clients keep the id they know


def test_builtin_models_cannot_be_cached() -> None:
    with pytest.raises(ValueError, match=r"spec\.model\.cache needs weights to copy"):
        make_service({"source": "builtin:tiny", "cache": {"size": "1Gi"}})
    make_service({"source": "builtin:tiny", "cache": {"size": "1Gi", "enabled": False}})


@pytest.mark.parametrize(
    ("num_bytes", "budget_s"),
    [
        (None, model_cache.STARTUP_UNKNOWN_S),
        (10 << 20, model_cache.STARTUP_MIN_S),  # a tiny model still gets the floor
        (16 << 30, 60 + 328),  # 16 GiB at 50 MiB/s: 327.7 s, rounded up, plus the margin
        (1 << 40, model_cache.STARTUP_MAX_S),  # 1 TiB: capped
    ],
)
def test_startup_budget_grows_with_the_model(num_bytes: int | None, budget_s: int) -> None:
    assert model_cache.startup_budget_s(num_bytes) == budget_s


def test_startup_probe_waits_for_ready_for_the_budget_of_the_known_bytes() -> None:
    svc = make_service()
    small = container_of(deployment.build_deployment(svc, default_image=IMAGE, model_bytes=1 << 30))["startupProbe"]
    big = container_of(deployment.build_deployment(svc, default_image=IMAGE, model_bytes=64 << 30))["startupProbe"]
    assert small["httpGet"]["path"] == meta.READY_PATH
    assert small["periodSeconds"] * small["failureThreshold"] >= model_cache.startup_budget_s(1 << 30)
    assert big["periodSeconds"] * big["failureThreshold"] >= model_cache.startup_budget_s(64 << 30)
    assert big["failureThreshold"] > small["failureThreshold"]
    # The bytes the fill counted win over the claim's size; without them the claim's size is the bound.
    ready = status_models.ModelCacheStatus(phase="Ready", bytes_total=123)
    assert model_cache.model_bytes(svc.spec, ready) == 123
    assert model_cache.model_bytes(svc.spec, None) == 5 << 30


def test_kv_cache_budget_reaches_the_runtime_config() -> None:
    svc = make_service({"source": HUB_ID}, kvCache={"memory": "512Mi", "blockSize": 32})
    data = configmap.runtime_config(svc.spec)
    assert data["kvCache"] == {"memory": "512Mi", "gpuMemoryUtilization": 0.9, "blockSize": 32}
    parsed = config.parse_config(data)
    assert parsed.kv_cache.memory_bytes == 512 << 20
    assert parsed.kv_cache.block_size == 32
    default = configmap.runtime_config(make_service({"source": HUB_ID}, kvCache={"gpuMemoryUtilization": 0.5}).spec)
    assert default["kvCache"] == {"gpuMemoryUtilization": 0.5, "blockSize": 16}
    # The pool is allocated at start: a new budget needs new pods.
    assert deployment.config_hash(svc.spec, image=IMAGE) != deployment.config_hash(
        make_service({"source": HUB_ID}).spec, image=IMAGE
    )


def _job(*, conditions: list[dict[str, Any]] | None = None, progress: dict[str, Any] | None = None,
         **status: Any) -> dict[str, Any]:  # fmt: skip
    annotations = {names.ANNOTATION_CACHE_PROGRESS: json.dumps(progress)} if progress else {}
    return {"metadata": {"annotations": annotations}, "status": {**status, "conditions": conditions or []}}


@pytest.mark.parametrize(
    ("job", "phase", "reason", "bytes_done"),
    [
        (None, "Pending", "JobNotCreated", None),
        (_job(), "Pending", "JobPending", None),
        (_job(active=1), "Pending", "JobPending", None),  # a pod that waits for its node or volume fills nothing
        (_job(active=1, ready=1), "Filling", "Filling", None),
        (_job(active=1, progress={"phase": "Filling", "bytesDone": 10, "bytesTotal": 40}), "Filling", "Filling", 10),
        (_job(active=1, failed=1, progress={"phase": "Failed", "reason": "DownloadFailed", "retryable": True}),
         "Filling", "Retrying", None),
        (_job(conditions=[{"type": "Complete", "status": "True"}], progress={"phase": "Ready", "bytesDone": 40,
                                                                            "bytesTotal": 40}), "Ready", "Filled", 40),
        (_job(failed=1, conditions=[{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}],
              progress={"phase": "Failed", "reason": "SourceNotFound", "message": "no /x"}),
         "Failed", "SourceNotFound", None),
        (_job(failed=4, conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]),
         "Failed", "BackoffLimitExceeded", None),
        (_job(conditions=[{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}],
              progress={"phase": "Filling", "bytesDone": 5, "bytesTotal": 40}), "Failed", "DeadlineExceeded", 5),
    ],
)  # fmt: skip
def test_cache_phase_from_the_job(job: dict[str, Any] | None, phase: str, reason: str, bytes_done: int | None) -> None:
    svc = make_service()
    found = model_cache.cache_status(svc, job)
    assert (found.phase, found.reason, found.bytes_done) == (phase, reason, bytes_done)
    assert found.claim_name == "chat-model-cache"
    assert model_cache.pods_allowed(svc.spec, found) == (phase == "Ready")


def test_pods_are_always_allowed_without_a_cache() -> None:
    svc = make_service({"source": HUB_ID})
    assert model_cache.pods_allowed(svc.spec, None)


def test_status_names_the_cache_while_nothing_serves() -> None:
    filling = status_models.ModelCacheStatus(phase="Filling", reason="Filling", message="10 of 40 bytes", bytes_done=10,
                                      bytes_total=40)  # fmt: skip
    found = {c.type: c for c in cache_status_mod.cache_conditions(filling, ready_replicas=0)}
    assert found[names.ConditionType.MODEL_CACHE_READY].status == "False"
    assert found[names.ConditionType.READY].reason == "ModelCacheFilling"
    assert "10/40 bytes (25%)" in found[names.ConditionType.READY].message
    assert cache_status_mod.phase("Pending", filling, ready_replicas=0) == "Pending"
    failed = status_models.ModelCacheStatus(phase="Failed", reason="SourceNotFound")
    assert cache_status_mod.phase("Pending", failed, ready_replicas=0) == "Failed"
    # Old replicas still serve while a new source fills: the service stays Ready.
    assert names.ConditionType.READY not in {
        c.type for c in cache_status_mod.cache_conditions(filling, ready_replicas=1)
    }
    assert cache_status_mod.phase("Ready", filling, ready_replicas=1) == "Ready"
