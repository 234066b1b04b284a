"""A change that needs new pods rolls the pod template; a tuning-only change never restarts pods."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from fleetlm_dev.testing import wait_for

pytestmark = pytest.mark.cluster

HASH = "fleetlm.dev/config-hash"


def test_image_change_rolls_the_pod_template(kube: Any, make_example: Any, operator: object) -> None:
    name = kube.new_name()
    kube.apply(make_example(name))
    before = kube.wait_get("deployment", name)

    kube.patch("llmservice", name, patch={"spec": {"runtime": {"image": "registry.invalid/runtime:v2"}}})

    def rolled() -> dict | None:
        found = kube.get("deployment", name)
        image = found["spec"]["template"]["spec"]["containers"][0]["image"]
        return found if image == "registry.invalid/runtime:v2" else None

    after = wait_for("a new pod template", rolled)
    assert after["metadata"]["generation"] > before["metadata"]["generation"]
    assert (
        after["spec"]["template"]["metadata"]["annotations"][HASH]
        != before["spec"]["template"]["metadata"]["annotations"][HASH]
    )
    wait_for("a second ReplicaSet for the rollout", lambda: len(kube.items("replicasets")) == 2)


def test_batch_limit_change_updates_config_without_touching_pods(
    kube: Any, make_example: Any, operator: object
) -> None:
    name = kube.new_name()
    body = make_example(name)
    body["spec"]["batching"]["autotune"] = False  # the spec's limits apply as written
    kube.apply(body)
    before = kube.wait_get("deployment", name)
    wait_for("one ReplicaSet", lambda: len(kube.items("replicasets")) == 1)

    kube.patch("llmservice", name, patch={"spec": {"batching": {"maxBatchSize": 16}}})

    def config_has_new_limit() -> bool:
        config = kube.get("configmap", f"{name}-config")
        return yaml.safe_load(config["data"]["runtime.yaml"])["batching"]["maxBatchSize"] == 16

    wait_for("the ConfigMap to carry the new limit", config_has_new_limit)
    wait_for("status.tuning to follow", lambda: kube.get("llmservice", name)["status"]["tuning"]["maxBatchSize"] == 16)
    after = kube.get("deployment", name)
    assert after["spec"]["template"] == before["spec"]["template"]
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    assert len(kube.items("replicasets")) == 1
