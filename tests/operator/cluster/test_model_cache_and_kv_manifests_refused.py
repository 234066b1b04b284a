"""Bad spec.model.cache and spec.kvCache sections are refused, by the models and by the real API server,
with a message that names the field; good ones are stored with their defaults and read back unchanged."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from fleetlm_dev.manifest_cases import Case, Manifest, delete, kubectl_apply, pydantic_errors, set_
from fleetlm_operator.api import models, names


def good_manifest(name: str = "good-cache") -> Manifest:
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.KIND,
        "metadata": {"name": name},
        "spec": {
            "model": {
                "source": "Qwen/Qwen2.5-0.5B-Instruct",
                "cache": {
                    "size": "20Gi",
                    "storageClassName": "filestore",
                    "accessMode": "ReadWriteMany",
                    "whenDeleted": "Delete",
                    "fill": {"timeout": "30m", "retries": 2, "hubTokenSecretRef": {"name": "hf-token"}},
                },
            },
            "runtime": {"gpus": 0},
            "kvCache": {"memory": "512Mi", "gpuMemoryUtilization": 0.8, "blockSize": 32},
        },
    }


CASES = (
    Case("cache-without-size", delete("spec.model.cache.size"), "spec.model.cache.size"),
    Case("cache-size-not-bytes", set_("spec.model.cache.size", "lots"), "spec.model.cache.size"),
    Case("cache-size-millis", set_("spec.model.cache.size", "500m"), "spec.model.cache.size"),
    Case("cache-read-only-many", set_("spec.model.cache.accessMode", "ReadOnlyMany"), "spec.model.cache.accessMode"),
    Case("cache-rwop", set_("spec.model.cache.accessMode", "ReadWriteOncePod"), "spec.model.cache.accessMode"),
    Case("cache-when-deleted-keep", set_("spec.model.cache.whenDeleted", "Keep"), "spec.model.cache.whenDeleted"),
    Case("cache-negative-retries", set_("spec.model.cache.fill.retries", -1), "spec.model.cache.fill.retries"),
    Case("cache-too-many-retries", set_("spec.model.cache.fill.retries", 50), "spec.model.cache.fill.retries"),
    Case("cache-timeout-zero", set_("spec.model.cache.fill.timeout", "0s"), "spec.model.cache.fill.timeout"),
    Case("cache-timeout-words", set_("spec.model.cache.fill.timeout", "an hour"), "spec.model.cache.fill.timeout"),
    Case(
        "cache-token-secret-name",
        set_("spec.model.cache.fill.hubTokenSecretRef.name", "HF_Token"),
        "spec.model.cache.fill.hubTokenSecretRef.name",
    ),
    Case("cache-of-builtin", set_("spec.model.source", "builtin:tiny"), "spec.model.cache"),
    Case("cache-unknown-field", set_("spec.model.cache.sizeGi", 20), "spec.model.cache.sizeGi"),
    Case("kv-memory-not-bytes", set_("spec.kvCache.memory", "plenty"), "spec.kvCache.memory"),
    Case("kv-memory-zero", set_("spec.kvCache.memory", 0), "spec.kvCache.memory"),
    Case(
        "kv-utilization-above-one", set_("spec.kvCache.gpuMemoryUtilization", 1.5), "spec.kvCache.gpuMemoryUtilization"
    ),
    Case("kv-utilization-zero", set_("spec.kvCache.gpuMemoryUtilization", 0), "spec.kvCache.gpuMemoryUtilization"),
    Case("kv-block-size-zero", set_("spec.kvCache.blockSize", 0), "spec.kvCache.blockSize"),
    Case("kv-block-size-huge", set_("spec.kvCache.blockSize", 1024), "spec.kvCache.blockSize"),
)


def bad_manifest(case: Case) -> Manifest:
    return case.applied_to(good_manifest)


def test_good_manifest_is_valid_for_the_models() -> None:
    assert pydantic_errors(good_manifest()) == ""


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_models_refuse_bad_cache_and_kv_sections_naming_the_field(case: Case) -> None:
    errors = pydantic_errors(bad_manifest(case))
    assert errors, f"{case.id}: the models accepted it"
    assert case.field in errors, errors


@pytest.fixture(scope="module")
def plane(control_plane: Any, llmservice_crd: Any) -> Any:
    return control_plane


@pytest.mark.cluster
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_api_server_refuses_bad_cache_and_kv_sections_naming_the_field(plane: Any, namespace: str,
                                                                       case: Case) -> None:  # fmt: skip
    result = kubectl_apply(plane, bad_manifest(case), namespace)
    assert result.returncode != 0, f"{case.id}: the API server accepted it:\n{result.stdout}"
    assert case.field in result.stderr, result.stderr


@pytest.mark.cluster
def test_api_server_stores_cache_and_kv_defaults_the_models_agree_with(plane: Any, namespace: str) -> None:
    name = f"cache-{uuid.uuid4().hex[:6]}"
    manifest = {
        "apiVersion": names.API_VERSION,
        "kind": names.KIND,
        "metadata": {"name": name},
        "spec": {"model": {"source": "/models/llama", "cache": {"size": "20Gi"}}, "runtime": {"gpus": 0}},
    }
    result = kubectl_apply(plane, manifest, namespace)
    assert result.returncode == 0, result.stderr
    stored = json.loads(plane.kubectl("get", f"{names.PLURAL}.{names.GROUP}", name, "-n", namespace,
                                      "-o", "json").stdout)  # fmt: skip
    cache = stored["spec"]["model"]["cache"]
    assert cache == {"enabled": True, "size": "20Gi", "accessMode": "ReadWriteMany", "whenDeleted": "Retain",
                     "fill": {"timeout": "1h", "retries": 3}}  # fmt: skip
    assert stored["spec"]["kvCache"] == {"gpuMemoryUtilization": 0.9, "blockSize": 16}
    assert models.load_stored(stored).spec == models.LLMService.model_validate(manifest).spec
    # The sizes may also be written as plain byte counts.
    manifest["spec"]["kvCache"] = {"memory": 536870912}
    assert kubectl_apply(plane, manifest, namespace).returncode == 0
