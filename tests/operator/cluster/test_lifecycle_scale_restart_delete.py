"""Operator restarts create nothing twice; /scale drives replicas; deleting an LLMService removes its children."""

from __future__ import annotations

from typing import Any

import pytest

from fleetlm_dev.testing import wait_for

pytestmark = pytest.mark.cluster

CHILD_KINDS = ("deployments", "services", "configmaps", "secrets", "poddisruptionbudgets")


def _owned(kube: Any, kind: str, uid: str) -> list[dict]:
    return [
        item
        for item in kube.items(kind)
        if any(ref["uid"] == uid for ref in item["metadata"].get("ownerReferences", []))
    ]


def test_restarted_operator_duplicates_and_loses_nothing(kube: Any, make_example: Any, operator_factory: Any) -> None:
    name = kube.new_name()
    with operator_factory():
        kube.apply(make_example(name))
        kube.wait_get("poddisruptionbudget", name)
        wait_for("status", lambda: (kube.get("llmservice", name) or {}).get("status", {}).get("endpoint"))
    uid = kube.get("llmservice", name)["metadata"]["uid"]
    before = {kind: _owned(kube, kind, uid) for kind in CHILD_KINDS}
    assert all(len(items) == 1 for items in before.values()), {k: len(v) for k, v in before.items()}

    # While the operator is down a second object arrives; the restarted operator must handle both.
    late = kube.new_name("late")
    kube.apply(make_example(late))
    with operator_factory():
        kube.wait_get("deployment", late)
        wait_for(
            "the late object's status", lambda: (kube.get("llmservice", late) or {}).get("status", {}).get("endpoint")
        )
        after = {kind: _owned(kube, kind, uid) for kind in CHILD_KINDS}

    for kind in CHILD_KINDS:
        assert [i["metadata"]["uid"] for i in after[kind]] == [i["metadata"]["uid"] for i in before[kind]], kind
    # The admin token was not rotated: pods already mounted it.
    assert after["secrets"][0]["data"] == before["secrets"][0]["data"]
    # The pod template did not change, so no rollout happened.
    assert after["deployments"][0]["spec"]["template"] == before["deployments"][0]["spec"]["template"]
    assert len([rs for rs in kube.items("replicasets") if rs["metadata"]["name"].startswith(name)]) == 1


def test_kubectl_scale_is_honoured_within_min_and_max(kube: Any, make_example: Any, operator: object) -> None:
    name = kube.new_name()
    body = make_example(name)
    body["spec"]["replicas"] = {"min": 1, "max": 4}
    body["spec"]["autoscaling"] = {"enabled": False}
    kube.apply(body)
    kube.wait_get("deployment", name)

    kube.plane.kubectl("scale", "llms", name, "-n", kube.namespace, "--replicas=3")
    wait_for("the Deployment to follow /scale", lambda: kube.get("deployment", name)["spec"]["replicas"] == 3)
    scale = kube.plane.kubectl(
        "get", "--raw", f"/apis/fleetlm.dev/v1alpha1/namespaces/{kube.namespace}/llmservices/{name}/scale"
    )
    assert '"replicas":3' in scale.stdout.replace(" ", "")

    refused = kube.plane.kubectl("scale", "llms", name, "-n", kube.namespace, "--replicas=9", check=False)
    assert refused.returncode != 0
    assert "spec.replicas.desired must lie within spec.replicas.min and spec.replicas.max" in refused.stderr
    assert kube.get("deployment", name)["spec"]["replicas"] == 3


def test_deleting_the_llmservice_garbage_collects_every_child(kube: Any, make_example: Any, operator: object) -> None:
    name = kube.new_name()
    kube.apply(make_example(name))
    kube.wait_get("poddisruptionbudget", name)
    uid = kube.get("llmservice", name)["metadata"]["uid"]
    assert all(_owned(kube, kind, uid) for kind in CHILD_KINDS)

    kube.plane.kubectl("delete", "llmservice", name, "-n", kube.namespace, "--wait=true", "--timeout=60s")

    # The garbage collector discovers new resource types every 30 s, so allow for one discovery cycle.
    wait_for(
        "every child to be garbage-collected",
        lambda: not any(_owned(kube, kind, uid) for kind in (*CHILD_KINDS, "replicasets", "pods")),
        timeout_s=120,
    )
