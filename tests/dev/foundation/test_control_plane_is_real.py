"""The control plane the tests use is the real thing: schema validation with CEL, controllers, GC, helm.

Each test exercises behaviour that only a real kube-apiserver with kube-controller-manager has; a mock
of the API would fail every one of them.
"""

from __future__ import annotations

import json
import pathlib
import textwrap

import pytest

from fleetlm_dev import cluster, k8s_build
from fleetlm_dev.testing import wait_for

pytestmark = pytest.mark.cluster

CHART_DIR = pathlib.Path(__file__).resolve().parents[2] / "fixtures" / "charts" / "tiny"

WIDGET_CRD = textwrap.dedent("""\
    apiVersion: apiextensions.k8s.io/v1
    kind: CustomResourceDefinition
    metadata:
      name: widgets.test.fleetlm.dev
    spec:
      group: test.fleetlm.dev
      scope: Namespaced
      names: {plural: widgets, singular: widget, kind: Widget}
      versions:
        - name: v1
          served: true
          storage: true
          schema:
            openAPIV3Schema:
              type: object
              properties:
                spec:
                  type: object
                  x-kubernetes-validations:
                    - rule: "self.min <= self.max"
                      message: "spec.min must be less than or equal to spec.max"
                  properties:
                    min: {type: integer}
                    max: {type: integer}
    """)


def _json(plane: cluster.ControlPlane, *args: str) -> dict:
    return json.loads(plane.kubectl(*args, "-o", "json").stdout)


def test_server_reports_the_stamped_release(control_plane: cluster.ControlPlane) -> None:
    version = json.loads(control_plane.kubectl("version", "-o", "json").stdout)["serverVersion"]
    assert version["gitVersion"] in (k8s_build.K8S_VERSION, k8s_build.K8S_FALLBACK_VERSION)
    assert version["gitTreeState"] == "clean"
    assert control_plane.k8s_version == version["gitVersion"]


def test_cel_rule_refuses_an_object_that_violates_it(control_plane: cluster.ControlPlane, namespace: str) -> None:
    control_plane.kubectl("apply", "-f", "-", input=WIDGET_CRD)
    control_plane.kubectl("wait", "--for=condition=Established", "crd/widgets.test.fleetlm.dev", "--timeout=60s")

    good = "apiVersion: test.fleetlm.dev/v1\nkind: Widget\nmetadata: {name: good}\nspec: {min: 1, max: 3}\n"
    bad = "apiVersion: test.fleetlm.dev/v1\nkind: Widget\nmetadata: {name: bad}\nspec: {min: 5, max: 3}\n"
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=good)
    refused = control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=bad, check=False)

    assert refused.returncode != 0
    assert "spec.min must be less than or equal to spec.max" in refused.stderr
    names = [item["metadata"]["name"] for item in _json(control_plane, "get", "widgets", "-n", namespace)["items"]]
    assert names == ["good"]


def test_deployment_gets_a_replicaset_and_pods(control_plane: cluster.ControlPlane, namespace: str) -> None:
    control_plane.kubectl(
        "create", "deployment", "web", "-n", namespace, "--image=registry.invalid/web:1", "--replicas=2"
    )

    def replicaset_owned_by_deployment() -> dict | None:
        for rs in _json(control_plane, "get", "replicasets", "-n", namespace)["items"]:
            if any(ref["kind"] == "Deployment" and ref["name"] == "web" for ref in rs["metadata"]["ownerReferences"]):
                return rs
        return None

    rs = wait_for("the deployment controller to create a ReplicaSet", replicaset_owned_by_deployment)

    def pods_owned_by_replicaset() -> list[dict] | None:
        pods = [
            pod
            for pod in _json(control_plane, "get", "pods", "-n", namespace)["items"]
            if any(ref["uid"] == rs["metadata"]["uid"] for ref in pod["metadata"].get("ownerReferences", []))
        ]
        return pods if len(pods) == 2 else None

    pods = wait_for("the replicaset controller to create 2 Pods", pods_owned_by_replicaset)
    assert {pod["spec"]["containers"][0]["image"] for pod in pods} == {"registry.invalid/web:1"}


def test_deleting_an_owner_garbage_collects_its_dependents(control_plane: cluster.ControlPlane, namespace: str) -> None:
    control_plane.kubectl("create", "configmap", "owner", "-n", namespace, "--from-literal=k=v")
    owner_uid = _json(control_plane, "get", "configmap", "owner", "-n", namespace)["metadata"]["uid"]
    dependent = json.dumps(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "dependent",
                "namespace": namespace,
                "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner_uid}],
            },
            "data": {"k": "v"},
        }
    )
    control_plane.kubectl("apply", "-f", "-", input=dependent)
    control_plane.kubectl("delete", "configmap", "owner", "-n", namespace)

    wait_for(
        "the garbage collector to delete the dependent",
        lambda: control_plane.kubectl("get", "configmap", "dependent", "-n", namespace, check=False).returncode != 0,
    )
    assert "NotFound" in control_plane.kubectl("get", "configmap", "dependent", "-n", namespace, check=False).stderr


def test_helm_installs_and_uninstalls_a_chart(control_plane: cluster.ControlPlane, namespace: str) -> None:
    control_plane.helm(
        "install", "demo", str(CHART_DIR), "-n", namespace, "--set", "greeting=hi", "--wait", "--timeout", "60s"
    )

    configmap = _json(control_plane, "get", "configmap", "demo-tiny", "-n", namespace)
    assert configmap["data"]["greeting"] == "hi"
    assert configmap["data"]["kubeVersion"] == control_plane.k8s_version
    releases = json.loads(control_plane.helm("list", "-n", namespace, "-o", "json").stdout)
    assert [(r["name"], r["status"]) for r in releases] == [("demo", "deployed")]

    control_plane.helm("uninstall", "demo", "-n", namespace, "--wait")
    assert control_plane.kubectl("get", "configmap", "demo-tiny", "-n", namespace, check=False).returncode != 0
