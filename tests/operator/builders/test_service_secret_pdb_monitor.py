"""The Service, admin-token Secret, PodDisruptionBudget and ServiceMonitor builders."""

from __future__ import annotations

import base64

import pytest

from fleetlm_operator.api import models, names
from fleetlm_operator.builders import meta, pdb, secret, service, servicemonitor


@pytest.fixture
def svc() -> models.LLMService:
    return models.LLMService.model_validate(
        {
            "metadata": {"name": "chat", "namespace": "ml"},
            "spec": {"model": {"source": "builtin:tiny"}, "autoscaling": {"interval": "20s"}},
        }
    )


def test_service_forwards_port_80_to_the_http_port(svc: models.LLMService) -> None:
    rendered = service.build_service(svc)
    assert (rendered["apiVersion"], rendered["kind"]) == ("v1", "Service")
    assert rendered["metadata"]["name"] == "chat"
    assert rendered["spec"]["type"] == "ClusterIP"
    assert rendered["spec"]["selector"] == meta.selector_labels(svc)
    [port] = rendered["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"]) == ("http", 80, "http")
    assert service.endpoint_url(svc) == "http://chat.ml.svc"


def test_admin_token_secret_holds_the_given_token(svc: models.LLMService) -> None:
    rendered = secret.build_admin_token_secret(svc, token="s3cr3t")
    assert (rendered["apiVersion"], rendered["kind"], rendered["type"]) == ("v1", "Secret", "Opaque")
    assert rendered["metadata"]["name"] == "chat-admin-token"
    assert base64.b64decode(rendered["data"]["token"]) == b"s3cr3t"
    assert secret.read_admin_token(rendered) == "s3cr3t"


def test_admin_token_may_not_be_empty(svc: models.LLMService) -> None:
    with pytest.raises(ValueError, match="never open"):
        secret.build_admin_token_secret(svc, token="")


def test_pdb_allows_one_disruption_and_evicts_unhealthy_pods(svc: models.LLMService) -> None:
    rendered = pdb.build_pod_disruption_budget(svc)
    assert (rendered["apiVersion"], rendered["kind"]) == ("policy/v1", "PodDisruptionBudget")
    assert rendered["spec"]["maxUnavailable"] == 1
    assert rendered["spec"]["selector"]["matchLabels"] == meta.selector_labels(svc)
    assert rendered["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_service_monitor_scrapes_metrics_at_the_tuning_interval(svc: models.LLMService) -> None:
    rendered = servicemonitor.build_service_monitor(svc)
    assert (rendered["apiVersion"], rendered["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
    assert rendered["spec"]["selector"]["matchLabels"] == meta.selector_labels(svc)
    assert rendered["spec"]["namespaceSelector"] == {"matchNames": ["ml"]}
    assert rendered["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "20s"}]
    # The ServiceMonitor selects the Service, so the Service must carry the selector labels.
    assert meta.selector_labels(svc).items() <= service.build_service(svc)["metadata"]["labels"].items()


@pytest.mark.parametrize(
    "build",
    [
        service.build_service,
        pdb.build_pod_disruption_budget,
        servicemonitor.build_service_monitor,
        lambda svc: secret.build_admin_token_secret(svc, token="t"),
    ],
)
def test_every_object_carries_the_standard_labels_and_no_owner(build: object, svc: models.LLMService) -> None:
    rendered = build(svc)  # type: ignore[operator]
    labels = rendered["metadata"]["labels"]
    for key in (
        names.LABEL_NAME,
        names.LABEL_INSTANCE,
        names.LABEL_COMPONENT,
        names.LABEL_PART_OF,
        names.LABEL_MANAGED_BY,
    ):
        assert key in labels
    assert labels[names.LABEL_LLMSERVICE] == "chat"
    assert rendered["metadata"]["namespace"] == "ml"
    assert "ownerReferences" not in rendered["metadata"]
