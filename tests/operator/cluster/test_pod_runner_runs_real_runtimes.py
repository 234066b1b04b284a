"""The demo's kubelet stand-in against the real control plane: the operator's pod runs as a real
`fleetlm-runtime` process, configured from the pod's own ConfigMap and Secret volumes; the pod turns
Ready with the process's address, the runtime serves, and a deleted pod's process is drained and gone."""

from __future__ import annotations

import json
import pathlib
import urllib.request
from typing import Any

import pytest

from fleetlm_dev import pod_runner
from fleetlm_dev.testing import wait_for

pytestmark = pytest.mark.cluster


def test_a_pod_runs_as_a_real_runtime_and_stops_with_its_pod(
    kube: Any, make_example: Any, operator: object, tmp_path: pathlib.Path
) -> None:
    name = kube.new_name("ran")
    body = make_example(name, autoscaling={"enabled": False})
    kube.apply(body)
    deployment = kube.wait_get("deployment", name)
    selector = ",".join(f"{k}={v}" for k, v in sorted(deployment["spec"]["selector"]["matchLabels"].items()))
    runner = pod_runner.PodRunner(plane=kube.plane, namespace=kube.namespace, selector=selector, directory=tmp_path)
    try:
        wait_for("a pod running as a ready runtime", lambda: runner.sync() and runner.ready_urls(), timeout_s=120)
        [url] = runner.ready_urls()
        [running] = runner.pods.values()
        pod = kube.get("pod", running.name)
        assert pod is not None and pod["status"]["podIP"] == running.ip
        assert {c["type"]: c["status"] for c in pod["status"]["conditions"]}["Ready"] == "True"
        # The runtime was configured from the ConfigMap the operator rendered (its batch limit) and
        # holds the admin token from the Secret (the admin API is open, with that token only).
        config = (tmp_path / running.name / "config" / "runtime.yaml").read_text()
        assert "maxBatchSize: 8" in config
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as resp:
            model = json.loads(resp.read())["data"][0]["id"]
        request = urllib.request.Request(
            url + "/v1/completions",
            data=json.dumps({"model": model, "prompt": "hi", "max_tokens": 3}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert json.loads(resp.read())["usage"]["completion_tokens"] == 3
        assert (tmp_path / running.name / "admin-token" / "token").read_text().strip()

        kube.plane.kubectl("delete", "pod", running.name, "-n", kube.namespace, "--wait=false")

        def stopped() -> bool:
            runner.sync()  # as the kubelet's sync loop: processes of pods that are gone get stopped
            return running.name not in runner.pods

        wait_for("the deleted pod's runtime to stop", stopped, timeout_s=60)
        assert running.process.poll() is not None
        assert running.process.returncode == 0  # SIGTERM: drained, exit 0
    finally:
        runner.stop_all()
