"""Advisory mode against the real control plane: with `spec.autoscaling.mode: advise` the tuner decides
every interval and records it (status.decisions marked `advise:`, an `Advised` Event, the decisions metric
with mode=advise) but applies nothing: /scale, the Deployment, the ConfigMap and the pod's limits stay as
they were. Switched to `act`, the next tick applies the current decision.

The runtime pod is a fake runtime on a loopback address, marked Ready by the test as a kubelet would.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fleetlm_dev import fake_runtime, pod_runner
from fleetlm_dev.testing import wait_for
from fleetlm_operator import metrics

pytestmark = pytest.mark.cluster

INTERVAL_S = 2.0


@pytest.fixture
def runtimes() -> Iterator[list[fake_runtime.FakeRuntime]]:
    started: list[fake_runtime.FakeRuntime] = []
    yield started
    for runtime in started:
        runtime.stop()


def _mark_ready(kube: Any, pod: str, ip: str) -> None:
    status = {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                         "conditions": [{"type": "Ready", "status": "True"},
                                        {"type": "ContainersReady", "status": "True"}]}}  # fmt: skip
    kube.plane.kubectl("patch", "pod", pod, "-n", kube.namespace, "--subresource=status", "--type=strategic",
                       "-p", json.dumps(status))  # fmt: skip


def _advised(action: str) -> float:
    # The operator runs in this process (KopfRunner), so its registry is the one it counts in.
    return metrics.REGISTRY.get_sample_value(
        "fleetlm_operator_tuning_decisions_total", {"action": action, "mode": "advise"}) or 0.0  # fmt: skip


def test_advise_records_every_decision_and_applies_none_until_act(
    kube: Any, make_example: Any, operator: object, runtimes: list
) -> None:
    name = kube.new_name("advise")
    body = make_example(name)
    body["spec"]["replicas"] = {"min": 1, "max": 4}
    body["spec"]["slo"] = {"ttft": "1s", "tpot": "200ms", "window": "6s"}
    body["spec"]["autoscaling"] = {"enabled": True, "mode": "advise", "interval": f"{INTERVAL_S:g}s",
                                   "scaleDownStabilization": "1m"}  # fmt: skip
    kube.apply(body)
    kube.wait_get("deployment", name)
    config_before = kube.get("configmap", f"{name}-config")["data"]
    pod = wait_for("the first runtime pod", lambda: next(iter(kube.items("pods")), None))
    token = wait_for("the admin token", lambda: kube.get("secret", f"{name}-admin-token"))
    runtime = fake_runtime.FakeRuntime(
        host=pod_runner.free_loopback_address(),
        port=8000,
        admin_token=base64.b64decode(token["data"]["token"]).decode(),
    ).start()
    runtimes.append(runtime)
    # Overloaded: a deep queue and TTFT 4x the target; act mode would scale up (test_tuner_closes_the_loop.py).
    runtime.load = fake_runtime.Load(requests_per_s=20, ttft_s=4.0, tpot_s=0.05, waiting=40, running=8, kv_usage=0.9)
    ups_before, shrinks_before = _advised("scale_up"), _advised("batch_shrink")
    _mark_ready(kube, pod["metadata"]["name"], runtime.host)

    def advice(action: str, count: int) -> dict | None:
        status = kube.get("llmservice", name).get("status") or {}
        decisions = [d for d in status.get("decisions", []) if action in d["action"]]
        return status if len(decisions) >= count else None

    # Several ticks of advice: each recorded, none applied.
    wait_for("two advised scale-ups", lambda: advice("scale_up", 2), timeout_s=90)

    def slo_judged() -> str | None:
        status = kube.get("llmservice", name).get("status") or {}
        value = next((c["status"] for c in status.get("conditions", []) if c["type"] == "SLOMet"), None)
        return value if value in ("True", "False") else None

    # The tuner still observes and judges. A tick applies its conditions after its status (decisions
    # included), so the status that first shows the second advice may predate that tick's SLOMet.
    assert wait_for("SLOMet judged", slo_judged, timeout_s=30) == "False"
    # Then per-token latency over target with nothing waiting: act mode would shrink the batch limit live.
    runtime.load = fake_runtime.Load(requests_per_s=4, ttft_s=0.2, tpot_s=0.6, waiting=0, running=8, kv_usage=0.5)
    status = wait_for("two advised batch shrinks", lambda: advice("batch_shrink", 2), timeout_s=90)
    advised = status["decisions"]  # every record: a tick that changes nothing is not recorded
    assert all(d["action"].startswith("advise:") for d in advised), advised
    assert all("advisory mode: decision recorded, not applied" in d["reason"] for d in advised), advised
    assert _advised("scale_up") - ups_before >= 2
    assert _advised("batch_shrink") - shrinks_before >= 2
    assert kube.get("llmservice", name)["spec"]["replicas"].get("desired", 1) == 1
    assert kube.get("deployment", name)["spec"]["replicas"] == 1
    assert kube.get("configmap", f"{name}-config")["data"] == config_before
    assert runtime.pushes == []
    # status.tuning says what the pods run with, which advice did not change.
    assert status["tuning"]["maxBatchSize"] == body["spec"]["batching"]["maxBatchSize"]
    events = kube.event_reasons(name)
    assert "Advised" in events
    assert "ScaledUp" not in events and "Tuned" not in events

    # Switch to act: the current decision (shrink the batch) is applied at the next tick.
    kube.patch("llmservice", name, patch={"spec": {"autoscaling": {"mode": "act"}}})
    switched = time.monotonic()
    # The tuner's queue bound (never applied while advising) may go out alone on the first acting tick: wait for
    # the push that carries the shrunk batch limit.
    spec_batch = body["spec"]["batching"]["maxBatchSize"]
    pushed = wait_for(
        "the batch limit pushed to the pod",
        lambda: [p for p in runtime.pushes if p["batching"]["maxBatchSize"] < spec_batch],
        timeout_s=30,
    )
    took_s = time.monotonic() - switched
    assert took_s <= 3 * INTERVAL_S + 5.0, took_s  # the next tick, with the timer's 5 s wake-up as slack
    assert pushed[-1]["batching"]["maxBatchSize"] < body["spec"]["batching"]["maxBatchSize"]
    # The tick's status patch lands after its push.
    status = wait_for("status.tuning to follow", lambda: (s := kube.get("llmservice", name)["status"])[
        "tuning"]["maxBatchSize"] == pushed[-1]["batching"]["maxBatchSize"] and s)  # fmt: skip
    acted = [d for d in status["decisions"] if not d["action"].startswith("advise:")]
    assert acted and "batch_shrink" in acted[0]["action"].split(","), status["decisions"]
