"""`helm install` into a real control plane; the operator, running as the chart's ServiceAccount,
reconciles an example; its RBAC allows what it uses and nothing else; `helm uninstall` keeps users' objects.
This cluster has the ServiceMonitor CRD, so the operator also creates a ServiceMonitor here.

The operator runs as a process on this machine (the test cluster has no kubelet to run its pod), with
a client certificate for `system:serviceaccount:<ns>:<sa>`: RBAC sees exactly the identity the pod
would have, so a missing rule shows up as a Forbidden error here as it would in production.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest

from fleetlm_dev import cluster, k8s_build
from fleetlm_dev.testing import stop_process, wait_for

pytestmark = pytest.mark.cluster

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
RELEASE, NAMESPACE = "fleetlm", "fleetlm-system"
SA = f"system:serviceaccount:{NAMESPACE}:{RELEASE}"


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.ControlPlane]:
    """A control plane of its own: the chart must install its CRD into a cluster that has none."""
    toolset = k8s_build.ensure_built()
    fresh = cluster.ControlPlane(directory=tmp_path_factory.mktemp("helm-plane"), bin_dir=toolset.bin_dir)
    fresh.start()
    try:
        yield fresh
    finally:
        fresh.stop()


# The Prometheus Operator's ServiceMonitor kind, reduced to what the API server needs to serve it.
SERVICE_MONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {"plural": "servicemonitors", "singular": "servicemonitor", "kind": "ServiceMonitor"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
            }
        ],
    },
}


@pytest.fixture(scope="module")
def installed(plane: cluster.ControlPlane) -> cluster.ControlPlane:
    plane.kubectl("apply", "-f", "-", input=json.dumps(SERVICE_MONITOR_CRD))
    plane.helm(
        "install",
        RELEASE,
        str(REPO_ROOT / "helm" / "fleetlm"),
        "-n",
        NAMESPACE,
        "--create-namespace",
        "--set",
        "operator.leaseDurationSeconds=6",
    )
    plane.kubectl("wait", "--for=condition=Established", "crd/llmservices.fleetlm.dev", "--timeout=60s")
    return plane


def _can_i(plane: cluster.ControlPlane, verb: str, resource: str, namespace: str | None = "demo") -> bool:
    # `kind/sub` is a subresource (kubectl would read it as an object named `sub`).
    resource, _, subresource = resource.partition("/")
    args = ["auth", "can-i", verb, resource, f"--as={SA}"]
    args += [f"--subresource={subresource}"] if subresource else []
    args += [f"--namespace={namespace}"] if namespace else []
    return plane.kubectl(*args, check=False).stdout.strip() == "yes"


@pytest.mark.parametrize(
    ("verb", "resource", "namespace"),
    [
        ("watch", "llmservices.fleetlm.dev", "demo"),
        ("patch", "llmservices.fleetlm.dev/status", "demo"),
        ("create", "deployments.apps", "demo"),
        ("patch", "deployments.apps", "demo"),
        ("delete", "deployments.apps", "demo"),  # the router's, when spec.router is switched off
        ("create", "services", "demo"),
        ("patch", "configmaps", "demo"),
        ("create", "secrets", "demo"),
        ("get", "secrets", "demo"),
        ("create", "poddisruptionbudgets.policy", "demo"),
        ("list", "pods", "demo"),
        ("create", "events", "demo"),
        ("create", "persistentvolumeclaims", "demo"),
        ("watch", "jobs.batch", "demo"),
        ("create", "jobs.batch", "demo"),
        ("patch", "jobs.batch", "demo"),  # held, so it may grant the fill's Role the same on one Job
        ("create", "serviceaccounts", "demo"),
        ("create", "roles.rbac.authorization.k8s.io", "demo"),
        ("create", "rolebindings.rbac.authorization.k8s.io", "demo"),
        ("create", "servicemonitors.monitoring.coreos.com", "demo"),
        ("update", "leases.coordination.k8s.io", NAMESPACE),
        ("list", "customresourcedefinitions.apiextensions.k8s.io", None),
    ],
)
def test_operator_may_do_what_it_needs(
    installed: cluster.ControlPlane, verb: str, resource: str, namespace: str | None
) -> None:
    assert _can_i(installed, verb, resource, namespace)


@pytest.mark.parametrize(
    ("verb", "resource", "namespace"),
    [
        ("list", "secrets", "demo"),  # it reads its own admin Secret by name, never lists Secrets
        ("delete", "llmservices.fleetlm.dev", "demo"),
        ("create", "pods", "demo"),
        ("update", "leases.coordination.k8s.io", "demo"),  # leases only in its own namespace
        ("create", "clusterrolebindings.rbac.authorization.k8s.io", None),
        ("delete", "nodes", None),
        ("patch", "customresourcedefinitions.apiextensions.k8s.io", None),
        ("create", "serviceaccounts/token", NAMESPACE),
        ("delete", "persistentvolumeclaims", "demo"),  # whenDeleted: Delete goes by garbage collection
    ],
)
def test_operator_is_refused_what_it_does_not_need(
    installed: cluster.ControlPlane, verb: str, resource: str, namespace: str | None
) -> None:
    assert not _can_i(installed, verb, resource, namespace)


def test_operator_as_the_chart_service_account_reconciles_an_example_and_uninstall_keeps_it(
    installed: cluster.ControlPlane, tmp_path: pathlib.Path
) -> None:
    plane = installed
    plane.kubectl("create", "namespace", "demo", check=False)
    kubeconfig = plane.kubeconfig_for(SA, groups=("system:serviceaccounts", f"system:serviceaccounts:{NAMESPACE}"))
    log_path = tmp_path / "operator.log"
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "FLEETLM_OPERATOR_NAMESPACE": NAMESPACE,
        "FLEETLM_METRICS_PORT": "0",
        "FLEETLM_HEALTH_PORT": "0",
        "FLEETLM_LEASE_DURATION_S": "6",
    }
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(pathlib.Path(sys.executable).parent / "fleetlm-operator"), "--log-format=json"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        plane.kubectl("apply", "-n", "demo", "-f", str(REPO_ROOT / "examples" / "llmservice-cpu-demo.yaml"))

        def reconciled() -> bool:
            body = json.loads(plane.kubectl("get", "llms", "tiny-demo", "-n", "demo", "-o", "json").stdout)
            return bool((body.get("status") or {}).get("endpoint"))

        wait_for("the operator to reconcile the example", reconciled, timeout_s=90)
        for kind in (
            "deployment",
            "service",
            "configmap/tiny-demo-config",
            "secret/tiny-demo-admin-token",
            "poddisruptionbudget",
            "servicemonitor",
        ):
            what = kind.split("/") if "/" in kind else [kind, "tiny-demo"]
            assert plane.kubectl("get", *what, "-n", "demo", check=False).returncode == 0, kind

        # A model cache: the chart's rules suffice to make its claim, its fill Job and the Role (which the
        # API server lets the operator grant only because it holds the same rights itself).
        cached = {
            "apiVersion": "fleetlm.dev/v1alpha1",
            "kind": "LLMService",
            "metadata": {"name": "cached-demo"},
            "spec": {"model": {"source": "/models/tiny", "cache": {"size": "1Gi"}}, "runtime": {"gpus": 0}},
        }
        plane.kubectl("apply", "-n", "demo", "-f", "-", input=json.dumps(cached))

        def cache_status() -> dict[str, str] | None:
            body = json.loads(plane.kubectl("get", "llms", "cached-demo", "-n", "demo", "-o", "json").stdout)
            return (body.get("status") or {}).get("modelCache")

        cache = wait_for("the operator to create the model cache", cache_status, timeout_s=90)
        for what in (
            ("pvc", cache["claimName"]),
            ("job", cache["jobName"]),
            ("serviceaccount", cache["claimName"]),
            ("role", cache["claimName"]),
            ("rolebinding", cache["claimName"]),
        ):
            assert plane.kubectl("get", *what, "-n", "demo", check=False).returncode == 0, what
    finally:
        stop_process(proc)
    log = log_path.read_text()
    assert "Forbidden" not in log and '"status": 403' not in log, log[-3000:]
    assert proc.returncode == 0

    plane.helm("uninstall", RELEASE, "-n", NAMESPACE, "--wait")
    assert plane.kubectl("get", "deployment", RELEASE, "-n", NAMESPACE, check=False).returncode != 0
    assert plane.kubectl("get", "clusterrole", f"{RELEASE}-discovery", check=False).returncode != 0
    # Users' objects stay: the CRD is kept (resource-policy), and with it every LLMService.
    assert plane.kubectl("get", "crd", "llmservices.fleetlm.dev", check=False).returncode == 0
    assert plane.kubectl("get", "llms", "tiny-demo", "-n", "demo", check=False).returncode == 0
