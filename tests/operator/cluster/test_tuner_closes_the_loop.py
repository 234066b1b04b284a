"""The SLO tuner against the real control plane, with runtime endpoints whose metrics the test sets.

Each runtime pod of the LLMService is stood in for by a fake runtime on its own loopback address; the
test marks the pod Ready with that address as its IP, as a kubelet would. The operator scrapes it,
decides with the pure policy, and acts: /scale and the Deployment, status, Events, pushes to the pod.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from fleetlm_dev import fake_runtime, pod_runner
from fleetlm_dev.testing import wait_for
from fleetlm_operator.api import names

pytestmark = pytest.mark.cluster


@pytest.fixture
def runtimes() -> Iterator[list[fake_runtime.FakeRuntime]]:
    started: list[fake_runtime.FakeRuntime] = []
    yield started
    for runtime in started:
        runtime.stop()


def _mark_ready(kube: Any, pod: str, ip: str) -> None:
    status = {
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}],
        }
    }
    kube.plane.kubectl(
        "patch", "pod", pod, "-n", kube.namespace, "--subresource=status", "--type=strategic", "-p", json.dumps(status)
    )


def _service(make_example: Any, name: str) -> dict:
    body = make_example(name)
    body["spec"]["replicas"] = {"min": 1, "max": 4}
    body["spec"]["slo"] = {"ttft": "1s", "tpot": "200ms", "window": "6s"}
    body["spec"]["autoscaling"] = {"enabled": True, "interval": "2s", "scaleDownStabilization": "1m"}
    return body


def _start_pod_runtime(kube: Any, name: str, runtimes: list[fake_runtime.FakeRuntime]) -> fake_runtime.FakeRuntime:
    pod = wait_for("the first runtime pod", lambda: next(iter(kube.items("pods")), None))
    token = wait_for("the admin token", lambda: kube.get("secret", f"{name}-admin-token"))
    import base64

    runtime = fake_runtime.FakeRuntime(
        host=pod_runner.free_loopback_address(),
        port=8000,
        admin_token=base64.b64decode(token["data"]["token"]).decode(),
    ).start()
    runtimes.append(runtime)
    _mark_ready(kube, pod["metadata"]["name"], runtime.host)
    return runtime


def test_slo_miss_with_a_queue_scales_up_and_is_explained(
    kube: Any, make_example: Any, operator: object, runtimes: list
) -> None:
    name = kube.new_name("tuned")
    kube.apply(_service(make_example, name))
    kube.wait_get("deployment", name)
    runtime = _start_pod_runtime(kube, name, runtimes)
    runtime.load = fake_runtime.Load(requests_per_s=20, ttft_s=4.0, tpot_s=0.05, waiting=40, running=8, kv_usage=0.9)

    def scaled() -> dict | None:
        body = kube.get("llmservice", name)
        return body if body["spec"]["replicas"].get("desired", 1) > 1 else None

    body = wait_for("the tuner to scale up", scaled, timeout_s=60)
    wait_for("the Deployment to follow", lambda: kube.get("deployment", name)["spec"]["replicas"] > 1)
    # The first tick has no baseline (rates unknown) yet scales up on the backlog alone; the next one
    # has a full window and can judge the SLO.
    status = wait_for(
        "a full window in status",
        lambda: (s := kube.get("llmservice", name)["status"]).get("observed", {}).get("ttftSeconds") and s,
        timeout_s=60,
    )
    assert any("scale_up" in d["action"] for d in status["decisions"])
    assert len(status["decisions"]) <= 5
    assert status["observed"]["ttftSeconds"] > 1.0
    assert status["observed"]["numPodsSampled"] == 1
    status = wait_for(
        "SLOMet=False",
        lambda: (
            (s := kube.get("llmservice", name)["status"])
            and any(c["type"] == "SLOMet" and c["status"] == "False" for c in s["conditions"])
            and s
        ),
    )
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["SLOMet"]["status"] == "False"
    assert conditions["MetricsAvailable"]["status"] == "True"
    # kopf applies the tick's state annotation when the handler returns, after the tick wrote /scale, so
    # the body that first showed the new replica count may predate it; a full window later it is there.
    assert body["spec"]["replicas"]["desired"] > 1
    assert kube.get("llmservice", name)["metadata"]["annotations"][names.ANNOTATION_TUNER_STATE]
    events = kube.event_reasons(name)
    assert "ScaledUp" in events


def test_tpot_miss_with_a_short_queue_shrinks_batches_live(
    kube: Any, make_example: Any, operator: object, runtimes: list
) -> None:
    name = kube.new_name("tuned")
    kube.apply(_service(make_example, name))
    kube.wait_get("deployment", name)
    runtime = _start_pod_runtime(kube, name, runtimes)
    # Per-token latency over target while nothing waits: a smaller batch, not more pods, is the fix.
    runtime.load = fake_runtime.Load(requests_per_s=4, ttft_s=0.2, tpot_s=0.6, waiting=0, running=8, kv_usage=0.5)

    pushed = wait_for("a tuning push to the pod", lambda: runtime.pushes, timeout_s=60)
    assert pushed[0]["batching"]["maxBatchSize"] < 8
    template_before = kube.get("deployment", name)["spec"]["template"]

    def config_follows() -> bool:
        config = yaml.safe_load(kube.get("configmap", f"{name}-config")["data"]["runtime.yaml"])
        return config["batching"]["maxBatchSize"] == pushed[-1]["batching"]["maxBatchSize"]

    wait_for("the ConfigMap to carry the new limit for new pods", config_follows)
    status = kube.get("llmservice", name)["status"]
    assert status["tuning"]["maxBatchSize"] < 8
    assert any("batch_shrink" in d["action"] for d in status["decisions"])
    # Tuning never restarts pods.
    assert kube.get("deployment", name)["spec"]["template"] == template_before
