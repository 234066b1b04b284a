"""The chart lints clean, renders for every values combination, matches crds/, and refuses bad values."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
from typing import Any

import pytest
import yaml

from fleetlm_dev import dashboard, k8s_build

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "helm" / "fleetlm"


def _helm(*args: str, tmp: pathlib.Path) -> subprocess.CompletedProcess[str]:
    helm = k8s_build.ensure_built().path("helm")
    env = {
        **os.environ,
        "HELM_CONFIG_HOME": str(tmp / "c"),
        "HELM_CACHE_HOME": str(tmp / "k"),
        "HELM_DATA_HOME": str(tmp / "d"),
    }
    return subprocess.run([str(helm), *args], capture_output=True, text=True, check=False, env=env, timeout=120)


def _render(tmp: pathlib.Path, *sets: str, namespace: str = "fleetlm-system") -> list[dict[str, Any]]:
    args = ["template", "r", str(CHART), "-n", namespace]
    for value in sets:
        args += ["--set", value]
    proc = _helm(*args, tmp=tmp)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def _kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(doc["kind"] for doc in docs)


def test_lint_is_clean(tmp_path: pathlib.Path) -> None:
    proc = _helm("lint", "--strict", str(CHART), tmp=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_default_values_render_operator_rbac_crd_and_dashboard(tmp_path: pathlib.Path) -> None:
    docs = _render(tmp_path)
    assert _kinds(docs) == [
        "ClusterRole",
        "ClusterRole",
        "ClusterRoleBinding",
        "ClusterRoleBinding",
        "ConfigMap",
        "CustomResourceDefinition",
        "Deployment",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
    ]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "fleetlm/operator:0.1.0"
    assert "--log-format=json" in container["args"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    for doc in docs:
        labels = doc["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "fleetlm", doc["kind"]


def test_the_chart_crd_is_the_generated_crd(tmp_path: pathlib.Path) -> None:
    rendered = next(d for d in _render(tmp_path) if d["kind"] == "CustomResourceDefinition")
    committed = yaml.safe_load((REPO_ROOT / "crds" / "llmservices.fleetlm.dev.yaml").read_text())
    assert rendered["spec"] == committed["spec"]
    assert rendered["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_crds_can_be_left_out(tmp_path: pathlib.Path) -> None:
    assert "CustomResourceDefinition" not in _kinds(_render(tmp_path, "crds.install=false"))


def test_watch_namespaces_grant_roles_only_there(tmp_path: pathlib.Path) -> None:
    docs = _render(tmp_path, "operator.watchNamespaces={team-a,team-b}")
    roles = {(d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs if d["kind"] == "Role"}
    assert roles == {("team-a", "r-fleetlm"), ("team-b", "r-fleetlm"), ("fleetlm-system", "r-fleetlm-leader-election")}
    cluster_roles = [d for d in docs if d["kind"] == "ClusterRole"]
    assert [d["metadata"]["name"] for d in cluster_roles] == ["r-fleetlm-discovery"]
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args


def test_optional_parts_switch_on_and_off(tmp_path: pathlib.Path) -> None:
    on = _kinds(_render(tmp_path, "metrics.serviceMonitor.enabled=true"))
    assert "ServiceMonitor" in on
    off = _kinds(
        _render(
            tmp_path,
            "dashboards.enabled=false",
            "rbac.create=false",
            "serviceAccount.create=false",
            "serviceAccount.name=existing",
        )
    )
    assert off == ["CustomResourceDefinition", "Deployment", "Service"]


def test_dashboard_is_the_generated_one_and_parses(tmp_path: pathlib.Path) -> None:
    config_map = next(d for d in _render(tmp_path) if d["kind"] == "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = json.loads(config_map["data"]["fleetlm-slo.json"])
    assert board == dashboard.build()
    titles = [panel["title"] for panel in board["panels"]]
    for wanted in (
        "TTFT p$percentile per class vs SLO",  # the LLMService's spec.slo.percentile, a dashboard variable
        "TPOT p$percentile per class vs SLO",
        "Replicas",
        "Batch limits",
        "Queue depth per class",
        "KV cache usage",
        "GPU utilization",
        "Tuning decisions",
    ):
        assert wanted in titles


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("operator.replicas=0", "/operator/replicas"),
        ("operator.logFormat=xml", "/operator/logFormat"),
        ("operator.watchNamespaces={Bad_Name}", "/operator/watchNamespaces/0"),
        ("operator.metricsPort=80", "/operator/metricsPort"),
        ("operator.replica=2", "additional properties 'replica' not allowed"),
        ("metrics.serviceMonitor.interval=often", "/metrics/serviceMonitor/interval"),
    ],
)
def test_bad_values_are_refused_naming_the_field(tmp_path: pathlib.Path, value: str, message: str) -> None:
    proc = _helm("template", "r", str(CHART), "--set", value, tmp=tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_service_account_name_is_required_without_creating_one(tmp_path: pathlib.Path) -> None:
    proc = _helm("template", "r", str(CHART), "--set", "serviceAccount.create=false", tmp=tmp_path)
    assert proc.returncode != 0
    assert "serviceAccount.name is required" in proc.stderr


def test_dashboard_file_is_current() -> None:
    assert dashboard.main(["--check"]) == 0
