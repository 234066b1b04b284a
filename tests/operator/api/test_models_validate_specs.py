"""The pydantic models refuse what the CRD refuses, naming the field, and fill the CRD's defaults.

Each invalid spec is one change to a valid one; the error must name the field the way a user wrote
it (camelCase), so `kubectl apply` and pure validation tell the user the same thing.
"""

from __future__ import annotations

import copy
from typing import Any

import pydantic
import pytest

from fleetlm_operator import bridge
from fleetlm_operator.api import fields, models, spec_models, status_models


def valid_spec() -> dict[str, Any]:
    return {
        "model": {"source": "Qwen/Qwen2.5-0.5B-Instruct", "revision": "main", "dtype": "bfloat16"},
        "runtime": {"gpus": 1, "resources": {"requests": {"cpu": 4, "memory": "16Gi"}}},
        "replicas": {"min": 1, "max": 4},
        "slo": {"ttft": "500ms", "tpot": "50ms"},
        "qos": {
            "classes": [
                {"name": "critical", "priority": 0, "weight": 4, "slo": {"ttft": "300ms"}},
                {"name": "batch", "priority": 100, "sheddable": True, "queueLimit": 32},
            ],
            "defaultClass": "critical",
        },
        "batching": {"maxBatchSize": 32, "maxBatchTokens": 4096},
        "autoscaling": {"metricsSource": "pods", "interval": "15s"},
    }


def with_change(path: str, value: Any) -> dict[str, Any]:
    spec = valid_spec()
    *parents, last = path.split(".")
    node: Any = spec
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if value is DELETE:
        del node[int(last) if isinstance(node, list) else last]
    else:
        node[int(last) if isinstance(node, list) else last] = copy.deepcopy(value)
    return spec


DELETE = object()


def errors_of(spec: dict[str, Any]) -> str:
    with pytest.raises(pydantic.ValidationError) as caught:
        spec_models.LLMServiceSpec.model_validate(spec)
    return str(caught.value)


def test_valid_spec_passes() -> None:
    spec = spec_models.LLMServiceSpec.model_validate(valid_spec())
    assert spec.qos.classes[1].queue_limit == 32
    assert spec.runtime.resources.requests.cpu == 4


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        ("replicas", {"min": 3, "max": 2}, "spec.replicas.min must be less than or equal to spec.replicas.max"),
        ("replicas.max", 0, "replicas.max"),
        ("replicas.min", -1, "replicas.min"),
        ("replicas.desired", 5, "spec.replicas.desired"),
        ("runtime.gpus", -1, "runtime.gpus"),
        ("runtime.gpus", 17, "runtime.gpus"),
        ("runtime.resources.limits.memory", "a lot", "runtime.resources.limits.memory"),
        ("runtime.resources.limits.cpu", -2, "runtime.resources.limits.cpu"),
        ("runtime.env", [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}], "spec.runtime.env names"),
        (
            "runtime.env",
            [{"name": "A", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
            "value and valueFrom",
        ),
        ("runtime.env", [{"name": "A", "valueFrom": {}}], "secretKeyRef or configMapKeyRef"),
        ("runtime.env", [{"name": "1A=", "value": "x"}], "runtime.env.0.name"),
        ("runtime.tolerations", [{"operator": "Equal", "value": "x"}], "operator must be Exists"),
        ("runtime.tolerations", [{"key": "k", "operator": "Exists", "value": "x"}], "value must be empty"),
        ("runtime.priorityClassName", "Not_A_Name", "runtime.priorityClassName"),
        ("model.dtype", "int4", "model.dtype"),
        ("model.source", DELETE, "model.source"),
        ("model.source", "", "model.source"),
        ("model.source", "s3://bucket/weights", "spec.model.source must be"),
        ("model.source", "pvc://", "spec.model.source must be"),
        ("model.source", "builtin:huge", "spec.model.source must be"),
        ("model.maxContextLength", 0, "model.maxContextLength"),
        ("slo.percentile", 100, "slo.percentile"),
        ("slo.percentile", 0, "slo.percentile"),
        ("slo.percentile", -5, "slo.percentile"),
        ("slo.ttft", "fast", "slo.ttft"),
        ("slo.ttft", "500", "slo.ttft"),
        ("slo.ttft", "1d", "slo.ttft"),
        ("slo.tpot", "0ms", "slo.tpot"),
        ("slo.window", "5 minutes", "slo.window"),
        ("slo.window", "10s", "spec.slo.window must be at least spec.autoscaling.interval"),
        ("slo", {"percentile": 99}, "spec.slo must set ttft, tpot or both"),
        ("qos.classes.1.name", "critical", "spec.qos.classes names must be unique"),
        ("qos.classes.0.name", "Critical", "qos.classes.0.name"),
        ("qos.classes.0.name", "a" * 33, "qos.classes.0.name"),
        ("qos.classes.0.priority", DELETE, "qos.classes.0.priority"),
        ("qos.classes.0.weight", 0, "qos.classes.0.weight"),
        ("qos.classes.1.queueLimit", 0, "qos.classes.1.queueLimit"),
        ("qos.classes.0.slo.ttft", "0s", "qos.classes.0.slo.ttft"),
        ("qos.classes.0.sheddable", True, "spec.qos.classes must include at least one class that is not sheddable"),
        ("qos.classes", [{"name": f"c{index}", "priority": index} for index in range(17)], "qos.classes"),
        ("qos.defaultClass", "gold", "spec.qos.defaultClass must name one of spec.qos.classes"),
        ("qos.defaultClass", DELETE, "spec.qos.defaultClass is required"),
        ("batching.maxBatchSize", 0, "batching.maxBatchSize"),
        ("batching.maxBatchSizeRange", {"min": 64, "max": 8}, "spec.batching.maxBatchSizeRange.min must be"),
        ("batching.maxBatchTokensRange", {"min": 8192, "max": 1024}, "spec.batching.maxBatchTokensRange.min"),
        ("batching.maxBatchSizeRange", {"min": 64, "max": 128}, "spec.batching.maxBatchSize must lie within"),
        ("batching.maxBatchTokensRange", {"min": 16, "max": 1024}, "spec.batching.maxBatchTokens must lie within"),
        ("batching.maxBatchTokens", 16, "spec.batching.maxBatchTokens must be at least spec.batching.maxBatchSize"),
        ("autoscaling.metricsSource", "prometheus", "spec.autoscaling.prometheusUrl is required"),
        ("autoscaling.metricsSource", "datadog", "autoscaling.metricsSource"),
        ("autoscaling.prometheusUrl", "prometheus:9090", "autoscaling.prometheusUrl"),
        ("autoscaling.interval", "500ms", "autoscaling.interval"),
        ("autoscaling.scaleDownStabilization", "forever", "autoscaling.scaleDownStabilization"),
        ("caching.responseCache.ttl", "0s", "caching.responseCache.ttl"),
        ("caching.responseCache.maxEntries", 0, "caching.responseCache.maxEntries"),
        ("caching.prefixCache.maxTokens", 0, "caching.prefixCache.maxTokens"),
        ("replicaCount", 3, "replicaCount"),
        ("runtime.gpu", 1, "runtime.gpu"),
    ],
)
def test_invalid_spec_is_refused_naming_the_field(path: str, value: Any, named: str) -> None:
    assert named in errors_of(with_change(path, value))


def test_defaults_match_what_platform_teams_expect() -> None:
    spec = spec_models.LLMServiceSpec.model_validate({"model": {"source": "builtin:tiny"}})
    assert spec.model.dtype == "auto"
    assert spec.runtime.gpus == 1
    assert (spec.replicas.min, spec.replicas.max, spec.replicas.desired) == (1, 1, None)
    assert spec.slo is None
    assert spec.qos.classes == [] and spec.qos.default_class is None and not spec.qos.allow_header_class
    assert (spec.batching.max_batch_size, spec.batching.max_batch_tokens, spec.batching.autotune) == (32, 8192, True)
    assert spec.caching.prefix_cache.enabled and not spec.caching.response_cache.enabled
    assert spec.autoscaling.enabled and spec.autoscaling.metrics_source == "pods"
    assert (spec.autoscaling.interval, spec.autoscaling.scale_down_stabilization) == ("15s", "5m")
    slo = spec_models.SLOSpec.model_validate({"ttft": "1s"})
    assert (slo.percentile, slo.window) == (95.0, "5m")


def test_json_names_are_camel_case_and_python_names_snake_case() -> None:
    spec = spec_models.LLMServiceSpec.model_validate(valid_spec())
    dumped = spec.model_dump(mode="json", exclude_none=True)
    assert "maxBatchSize" in dumped["batching"]
    assert "defaultClass" in dumped["qos"]
    assert spec.batching.max_batch_size == 32
    # Python names are accepted too, so pure code can build specs.
    assert spec_models.BatchingSpec(max_batch_size=4, max_batch_tokens=64).max_batch_size == 4


def test_models_are_immutable() -> None:
    spec = spec_models.LLMServiceSpec.model_validate(valid_spec())
    with pytest.raises(pydantic.ValidationError):
        spec.replicas.min = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("2s", 2.0), ("1m30s", 90.0), ("5m", 300.0), ("1h", 3600.0), ("1.5s", 1.5), ("0s", 0.0)],
)
def test_durations_parse_like_go(text: str, seconds: float) -> None:
    assert fields.parse_duration_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "5 m", "-1s", "1d", "1.s", "ms", "1us"])
def test_malformed_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        fields.parse_duration_s(text)


@pytest.mark.parametrize(
    "source",
    [
        "builtin:tiny",
        "gpt2",
        "Qwen/Qwen2.5-0.5B-Instruct",
        "hf://meta-llama/Llama-3.1-8B-Instruct",
        "pvc://model-weights/meta-llama/Llama-3.1-8B-Instruct",
        "pvc://weights",
        "/models/llama",
    ],
)
def test_supported_model_sources(source: str) -> None:
    assert spec_models.ModelSpec(source=source).source == source


def test_stored_object_with_desired_outside_lowered_bounds_is_clamped() -> None:
    body = {
        "apiVersion": "fleetlm.dev/v1alpha1",
        "kind": "LLMService",
        "metadata": {"name": "chat", "namespace": "ml", "uid": "u", "generation": 3, "managedFields": []},
        "spec": {"model": {"source": "builtin:tiny"}, "replicas": {"min": 1, "max": 2, "desired": 5}},
        "status": {"replicas": 5, "someFutureField": 1},
    }
    svc = models.load_stored(body)
    assert svc.spec.replicas.effective == 2
    assert (svc.name, svc.namespace, svc.metadata.generation) == ("chat", "ml", 3)
    with pytest.raises(pydantic.ValidationError, match=r"spec\.replicas\.desired"):
        models.LLMService.model_validate(body)


@pytest.mark.parametrize(
    ("replicas", "effective"),
    [({"min": 2, "max": 5}, 2), ({"min": 2, "max": 5, "desired": 4}, 4), ({"min": 0, "max": 3, "desired": 0}, 0)],
)
def test_effective_replicas(replicas: dict[str, int], effective: int) -> None:
    assert spec_models.ReplicasSpec.model_validate(replicas).effective == effective


@pytest.mark.parametrize("name", ["a" * 64, "llama.v2"])
def test_resource_names_that_cannot_name_children_are_refused(name: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=r"metadata\.name"):
        models.LLMService.model_validate({"metadata": {"name": name}, "spec": {"model": {"source": "builtin:tiny"}}})


def test_status_round_trips_and_ignores_unknown_fields() -> None:
    status = status_models.LLMServiceStatus.model_validate(
        {
            "phase": "Ready",
            "replicas": 2,
            "readyReplicas": 2,
            "selector": "app.kubernetes.io/instance=chat",
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "Available", "lastTransitionTime": "2026-01-02T03:04:05Z"}
            ],
            "observed": {
                "percentile": 95,
                "ttftSeconds": 0.42,
                "sloAttainment": 0.97,
                "numPodsSampled": 2,
                "numPodsExpected": 2,
            },
            "tuning": {"maxBatchSize": 48, "shedClasses": ["batch"], "classWeights": {"critical": 6}},
            "decisions": [{"time": "2026-01-02T03:04:05Z", "action": "scale_up", "reason": "TTFT p95 0.9s > 0.5s"}],
            "addedLater": True,
        }
    )
    assert status.observed is not None and status.observed.tpot_seconds is None  # missing stays missing
    dumped = status.model_dump(mode="json", exclude_none=True)
    assert dumped["conditions"][0]["lastTransitionTime"] == "2026-01-02T03:04:05Z"
    assert status_models.LLMServiceStatus.model_validate(dumped) == status


def test_decision_history_is_bounded_by_the_crds_bound() -> None:
    history: list[dict[str, Any]] = [{"time": "2026-01-01T00:00:00Z", "action": "ScaleUp", "reason": "old name"}]
    for index in range(status_models.MAX_DECISIONS + 5):
        record = status_models.DecisionRecord.model_validate(
            {"time": f"2026-01-01T00:00:{index:02d}Z", "action": "scale_up,batch_shrink", "reason": str(index)}
        )
        history = [status_models.status_json(r) for r in bridge.bounded_history(history, record)]
        assert "old name" not in {r["reason"] for r in history}  # no longer valid here: dropped, not written back
    assert len(history) == status_models.MAX_DECISIONS
    assert history[-1]["reason"] == str(status_models.MAX_DECISIONS + 4)
    assert history[0]["reason"] == "5"


@pytest.mark.parametrize("action", ["hold", "ScaleUp", "scale_up,", "advise:", "advise:hold", "scale_up;shed", ""])
def test_a_decision_names_only_the_actions_the_operator_takes(action: str) -> None:
    with pytest.raises(pydantic.ValidationError, match="action"):
        status_models.DecisionRecord.model_validate({"time": "2026-01-01T00:00:00Z", "action": action, "reason": "r"})


def test_initial_tuning_comes_from_the_spec() -> None:
    spec = spec_models.LLMServiceSpec.model_validate(valid_spec())
    tuning = models.initial_tuning(spec)
    assert (tuning.max_batch_size, tuning.max_batch_tokens) == (32, 4096)
    assert tuning.class_weights == {"critical": 4, "batch": 1}
    assert tuning.shed_classes == []
