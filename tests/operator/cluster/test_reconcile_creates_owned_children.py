"""An LLMService becomes a Deployment, Service, ConfigMap, admin Secret and PDB, all owned by it."""

from __future__ import annotations

import base64
from typing import Any

import pytest
import yaml

from fleetlm_dev.testing import wait_for

pytestmark = pytest.mark.cluster


def test_children_appear_with_the_right_fields_and_owner(kube: Any, make_example: Any, operator: object) -> None:
    name = kube.new_name()
    kube.apply(make_example(name))
    uid = kube.wait_get("llmservice", name)["metadata"]["uid"]

    deployment = kube.wait_get("deployment", name)
    service = kube.wait_get("service", name)
    config = kube.wait_get("configmap", f"{name}-config")
    token = kube.wait_get("secret", f"{name}-admin-token")
    budget = kube.wait_get("poddisruptionbudget", name)
    for child in (deployment, service, config, token, budget):
        refs = child["metadata"]["ownerReferences"]
        assert [(r["kind"], r["name"], r["uid"], r.get("controller")) for r in refs] == [
            ("LLMService", name, uid, True)
        ], child["kind"]

    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "registry.invalid/fleetlm/runtime:test"
    assert "builtin:tiny" in container.get("command", []) + container.get("args", [])
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert "preStop" in container["lifecycle"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})  # the demo asks for 0 GPUs
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/etc/fleetlm/config", "/etc/fleetlm/admin"} <= mounts

    # The test cluster has no ServiceMonitor CRD, so none is made (the Helm test covers the other case).
    assert kube.plane.kubectl("get", "crd", "servicemonitors.monitoring.coreos.com", check=False).returncode != 0

    runtime_yaml = yaml.safe_load(config["data"]["runtime.yaml"])
    assert runtime_yaml["batching"] == {"maxBatchSize": 8, "maxBatchTokens": 512}
    assert len(base64.b64decode(token["data"]["token"])) >= 32
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_gpu_request_becomes_an_nvidia_limit(kube: Any, make_example: Any, operator: object) -> None:
    name = kube.new_name()
    body = make_example(name)
    body["spec"]["runtime"] = {"gpus": 2, "nodeSelector": {"gpu": "h100"}, "priorityClassName": "inference"}
    kube.apply(body)
    pod = kube.wait_get("deployment", name)["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] in (2, "2")
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["priorityClassName"] == "inference"


def test_status_reports_phase_selector_endpoint_and_conditions(kube: Any, make_example: Any, operator: object) -> None:
    name = kube.new_name()
    kube.apply(make_example(name))

    def status_written() -> dict | None:
        body = kube.get("llmservice", name)
        status = (body or {}).get("status", {})
        return body if status.get("observedGeneration") == body["metadata"]["generation"] else None

    status = wait_for("the operator to write status", status_written)["status"]
    assert status["endpoint"] == f"http://{name}.{kube.namespace}.svc"
    assert status["selector"].count("=") == 3
    types = {c["type"]: c for c in status["conditions"]}
    assert {"Ready", "Progressing", "SLOMet", "MetricsAvailable", "CapacityUnavailable"} <= set(types)
    assert types["SLOMet"]["status"] == "Unknown"

    # No node exists in the test cluster, so the scheduler cannot place the runtime pod: the status says so.
    def capacity_unavailable() -> dict | None:
        conditions = (kube.get("llmservice", name) or {}).get("status", {}).get("conditions", [])
        return next((c for c in conditions if c["type"] == "CapacityUnavailable" and c["status"] == "True"), None)

    assert wait_for("CapacityUnavailable=True", capacity_unavailable)["reason"] == "Unschedulable"
    # The Deployment's own status catches up a moment later (its pod exists but cannot run).
    status = wait_for(
        "status.replicas=1", lambda: (s := kube.get("llmservice", name)["status"]).get("replicas") == 1 and s
    )
    assert status["phase"] == "Pending"
    assert status["readyReplicas"] == 0

    events = kube.event_reasons(name, kind="LLMService")
    assert "Reconciled" in events


def test_printer_columns_show_readiness_and_slo(kube: Any, make_example: Any, operator: object) -> None:
    name = kube.new_name()
    kube.apply(make_example(name))
    kube.wait_get("deployment", name)
    header = kube.plane.kubectl("get", "llms", name, "-n", kube.namespace).stdout.splitlines()[0].split()
    assert header[:3] == ["NAME", "READY", "REPLICAS"]
    assert "SLO-MET" in header and "AGE" in header
