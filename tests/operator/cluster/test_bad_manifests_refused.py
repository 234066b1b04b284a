"""The API server refuses bad LLMService manifests with a message that names the field.

One table of cases, each a mutation of a good manifest and the field path the refusal must name.
The cluster tests apply the generated CRD to the real control plane and `kubectl apply` each case;
a pure companion test runs the same table through the pydantic models, so the models and the CRD
refuse the same manifests.
"""

from __future__ import annotations

import json
import pathlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from fleetlm_dev.manifest_cases import Case, Manifest, delete, kubectl_apply, pydantic_errors, set_
from fleetlm_operator.api import crdgen, models, names

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
CRD_PATH = REPO_ROOT / crdgen.CRD_FILE


def good_manifest(name: str = "good") -> Manifest:
    """A manifest that uses every section, so each case below changes one thing in it."""
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.KIND,
        "metadata": {"name": name},
        "spec": {
            "model": {"source": "builtin:tiny", "dtype": "float32"},
            "runtime": {
                "gpus": 0,
                "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}},
                "env": [{"name": "LOG_LEVEL", "value": "info"}],
                "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}],
            },
            "replicas": {"min": 1, "max": 3},
            "slo": {"ttft": "500ms", "tpot": "50ms", "percentile": 95, "window": "5m"},
            "qos": {
                "classes": [
                    {"name": "critical", "priority": 0, "weight": 4},
                    {"name": "standard", "priority": 10, "weight": 2},
                    {"name": "batch", "priority": 100, "sheddable": True, "queueLimit": 16},
                ],
                "defaultClass": "standard",
            },
            "batching": {"maxBatchSize": 8, "maxBatchTokens": 512},
            "autoscaling": {"metricsSource": "pods", "interval": "15s"},
        },
    }


CASES: tuple[Case, ...] = (
    Case("min-above-max", set_("spec.replicas", {"min": 4, "max": 2}), "spec.replicas.min"),
    Case("max-zero", set_("spec.replicas.max", 0), "spec.replicas.max"),
    Case("desired-above-max", set_("spec.replicas.desired", 9), "spec.replicas.desired"),
    Case("negative-gpus", set_("spec.runtime.gpus", -1), "spec.runtime.gpus"),
    Case("unknown-dtype", set_("spec.model.dtype", "int4"), "spec.model.dtype"),
    Case("missing-model-source", delete("spec.model.source"), "spec.model.source"),
    Case("unsupported-model-source", set_("spec.model.source", "s3://bucket/llama"), "spec.model.source"),
    Case("percentile-100", set_("spec.slo.percentile", 100), "spec.slo.percentile"),
    Case("percentile-zero", set_("spec.slo.percentile", 0), "spec.slo.percentile"),
    Case("malformed-ttft", set_("spec.slo.ttft", "fast"), "spec.slo.ttft"),
    Case("malformed-window", set_("spec.slo.window", "5 minutes"), "spec.slo.window"),
    Case("zero-tpot", set_("spec.slo.tpot", "0ms"), "spec.slo.tpot"),
    Case("slo-without-targets", set_("spec.slo", {"percentile": 99}), "spec.slo"),
    Case("window-shorter-than-interval", set_("spec.slo.window", "10s"), "spec.slo.window"),
    Case(
        "duplicate-class-names",
        set_("spec.qos.classes.1.name", "critical"),
        "spec.qos.classes",
    ),
    Case("default-class-not-listed", set_("spec.qos.defaultClass", "gold"), "spec.qos.defaultClass"),
    Case("default-class-missing", delete("spec.qos.defaultClass"), "spec.qos.defaultClass"),
    Case("class-name-not-dns", set_("spec.qos.classes.0.name", "Critical_Users"), "spec.qos.classes[0].name"),
    Case(
        "every-class-sheddable",
        set_(
            "spec.qos.classes",
            [{"name": "a", "priority": 0, "sheddable": True}, {"name": "b", "priority": 1, "sheddable": True}],
        ),
        "spec.qos.classes",
    ),
    Case(
        "batch-size-range-inverted",
        set_("spec.batching.maxBatchSizeRange", {"min": 64, "max": 8}),
        "spec.batching.maxBatchSizeRange",
    ),
    Case(
        "batch-size-outside-range",
        set_("spec.batching.maxBatchSizeRange", {"min": 16, "max": 64}),
        "spec.batching.maxBatchSize",
    ),
    Case(
        "batch-tokens-below-batch-size",
        set_("spec.batching", {"maxBatchSize": 64, "maxBatchTokens": 32}),
        "spec.batching.maxBatchTokens",
    ),
    Case(
        "prometheus-without-url",
        set_("spec.autoscaling.metricsSource", "prometheus"),
        "spec.autoscaling.prometheusUrl",
    ),
    Case("interval-below-1s", set_("spec.autoscaling.interval", "500ms"), "spec.autoscaling.interval"),
    Case("priority-aging-below-1s", set_("spec.qos.priorityAging", "500ms"), "spec.qos.priorityAging"),
    Case("priority-aging-above-1h", set_("spec.qos.priorityAging", "1h1s"), "spec.qos.priorityAging"),
    Case(
        "malformed-memory",
        set_("spec.runtime.resources.requests.memory", "lots"),
        "spec.runtime.resources.requests.memory",
    ),
    Case(
        "env-value-and-value-from",
        set_("spec.runtime.env.0.valueFrom", {"secretKeyRef": {"name": "s", "key": "k"}}),
        "spec.runtime.env[0]",
    ),
    Case(
        "duplicate-env-names",
        set_("spec.runtime.env", [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]),
        "spec.runtime.env",
    ),
    Case(
        "toleration-exists-with-value",
        set_("spec.runtime.tolerations.0.operator", "Exists"),
        "spec.runtime.tolerations[0]",
    ),
    Case("unknown-field", set_("spec.replicaCount", 3), "spec.replicaCount"),
    Case("name-with-dot", set_("metadata.name", "llama.v2"), "metadata.name"),
)


def bad_manifest(case: Case) -> Manifest:
    return case.applied_to(good_manifest)


# --------------------------------------------------------------------------------------------------
# Pure companion: the models refuse the same manifests, naming the same field.


def test_good_manifest_is_valid_for_the_models() -> None:
    assert pydantic_errors(good_manifest()) == ""


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_models_refuse_bad_manifest_naming_the_field(case: Case) -> None:
    errors = pydantic_errors(bad_manifest(case))
    assert errors, f"{case.id}: the models accepted it"
    assert case.field in errors, errors


def test_at_least_twelve_cases() -> None:
    assert len(CASES) >= 12
    assert len({case.id for case in CASES}) == len(CASES)


# --------------------------------------------------------------------------------------------------
# Against the real API server.


@pytest.fixture(scope="module")
def llmservice_crd(control_plane: Any) -> Iterator[Any]:
    """The generated CRD applied (server-side) and Established; left installed for later tests."""
    control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_PATH))
    control_plane.kubectl("wait", "--for=condition=Established", f"crd/{names.CRD_NAME}", "--timeout=60s")
    yield control_plane


def _delete(control_plane: Any, name: str, namespace: str) -> None:
    control_plane.kubectl(
        "delete",
        f"{names.PLURAL}.{names.GROUP}",
        name,
        "-n",
        namespace,
        "--ignore-not-found",
        "--wait=false",
        check=False,
    )


def _get(control_plane: Any, name: str, namespace: str) -> Manifest:
    result = control_plane.kubectl("get", f"{names.PLURAL}.{names.GROUP}", name, "-n", namespace, "-o", "json")
    loaded: Manifest = json.loads(result.stdout)
    return loaded


@pytest.mark.cluster
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_api_server_refuses_bad_manifest_naming_the_field(llmservice_crd: Any, namespace: str, case: Case) -> None:
    manifest = bad_manifest(case)
    result = kubectl_apply(llmservice_crd, manifest, namespace)
    try:
        assert result.returncode != 0, f"{case.id}: the API server accepted it:\n{result.stdout}"
        assert case.field in result.stderr, result.stderr
    finally:
        if result.returncode == 0:
            _delete(llmservice_crd, manifest["metadata"]["name"], namespace)


@pytest.mark.cluster
def test_api_server_accepts_good_manifest_and_fills_defaults(llmservice_crd: Any, namespace: str) -> None:
    name = f"good-{uuid.uuid4().hex[:6]}"
    manifest = {
        "apiVersion": names.API_VERSION,
        "kind": names.KIND,
        "metadata": {"name": name},
        "spec": {"model": {"source": "builtin:tiny"}, "runtime": {"gpus": 0}, "slo": {"ttft": "2s"}},
    }
    result = kubectl_apply(llmservice_crd, manifest, namespace)
    assert result.returncode == 0, result.stderr
    try:
        stored = _get(llmservice_crd, name, namespace)
        spec = stored["spec"]
        assert spec["model"]["dtype"] == "auto"
        assert spec["replicas"] == {"min": 1, "max": 1}
        assert spec["slo"]["percentile"] == 95
        assert spec["slo"]["window"] == "5m"
        assert spec["batching"]["maxBatchSize"] == 32
        assert spec["batching"]["maxBatchSizeRange"] == {"min": 1, "max": 1024}
        assert spec["autoscaling"]["metricsSource"] == "pods"
        assert spec["caching"]["responseCache"]["ttl"] == "10m"
        # What the API server stored, the models read back unchanged, with the same defaults.
        parsed = models.load_stored(stored)
        expected = models.LLMService.model_validate(manifest)
        assert parsed.spec == expected.spec
    finally:
        _delete(llmservice_crd, name, namespace)


@pytest.mark.cluster
def test_every_example_is_accepted(llmservice_crd: Any, namespace: str) -> None:
    for path in sorted((REPO_ROOT / "examples").glob("llmservice-*.yaml")):
        manifest = yaml.safe_load(path.read_text(encoding="utf-8"))
        manifest["metadata"].pop("namespace", None)
        result = llmservice_crd.kubectl(
            "apply", "--dry-run=server", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest), check=False
        )
        assert result.returncode == 0, f"{path.name}: {result.stderr}"


@pytest.mark.cluster
def test_scale_subresource_writes_desired_within_bounds(llmservice_crd: Any, namespace: str) -> None:
    name = f"scale-{uuid.uuid4().hex[:6]}"
    manifest = good_manifest(name=name)
    assert kubectl_apply(llmservice_crd, manifest, namespace).returncode == 0
    try:
        resource = f"{names.PLURAL}.{names.GROUP}/{name}"
        llmservice_crd.kubectl("scale", resource, "-n", namespace, "--replicas=2")
        assert _get(llmservice_crd, name, namespace)["spec"]["replicas"]["desired"] == 2

        refused = llmservice_crd.kubectl("scale", resource, "-n", namespace, "--replicas=7", check=False)
        assert refused.returncode != 0
        assert "spec.replicas.desired" in refused.stderr, refused.stderr

        # Lowering max below a desired count that someone else wrote is allowed (the operator clamps);
        # only a new or changed `desired` must lie within the bounds.
        lowered = good_manifest(name=name)
        lowered["spec"]["replicas"] = {"min": 1, "max": 1}
        result = kubectl_apply(llmservice_crd, lowered, namespace)
        assert result.returncode == 0, result.stderr
        stored = _get(llmservice_crd, name, namespace)
        assert stored["spec"]["replicas"]["desired"] == 2
        assert models.load_stored(stored).spec.replicas.effective == 1
    finally:
        _delete(llmservice_crd, name, namespace)


@pytest.mark.cluster
def test_kubectl_explain_teaches_the_slo(llmservice_crd: Any) -> None:
    # The API server publishes the CRD's OpenAPI a moment after it is Established.
    deadline = time.monotonic() + 60
    while True:
        result = llmservice_crd.kubectl("explain", "llmservices.spec.slo", check=False)
        if result.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert result.returncode == 0, result.stderr
    for field in ("ttft", "tpot", "percentile", "window"):
        assert field in result.stdout
    assert "Latency targets" in result.stdout
