"""Start-up the scaler understands, against the real control plane: the tuner learns the service's start-up
time from its own pod (creation -> Ready), scales up once under pressure, and while the new pods load it does
not scale up again for the same pressure, tick after tick; status.startup shows the learnt time and the pods
loading. Past twice the learnt start-up the loading pods stop counting, and the tuner replaces them.

The runtime pods are stood in for by fake runtimes on loopback addresses, marked Ready by the test as a
kubelet would (with the condition's lastTransitionTime); the pods the tuner adds are never marked Ready, so
they stay loading for as long as the test likes.
"""

from __future__ import annotations

import base64
import datetime
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fleetlm_dev import fake_runtime, pod_runner
from fleetlm_dev.testing import wait_for
from fleetlm_operator.api import names

pytestmark = pytest.mark.cluster

STARTUP_S = 8.0  # how long the test keeps the first pod loading before it turns Ready


@pytest.fixture
def runtimes() -> Iterator[list[fake_runtime.FakeRuntime]]:
    started: list[fake_runtime.FakeRuntime] = []
    yield started
    for runtime in started:
        runtime.stop()


def _epoch_s(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _mark_ready(kube: Any, pod: str, ip: str) -> None:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    conditions = [{"type": kind, "status": "True", "lastTransitionTime": now} for kind in ("Ready", "ContainersReady")]
    status = {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "conditions": conditions}}
    kube.plane.kubectl("patch", "pod", pod, "-n", kube.namespace, "--subresource=status", "--type=strategic",
                       "-p", json.dumps(status))  # fmt: skip


def _desired(kube: Any, name: str) -> int:
    return int(kube.get("llmservice", name)["spec"]["replicas"].get("desired", 1))


def test_loading_replicas_are_counted_and_status_shows_the_start_up(
    kube: Any, make_example: Any, operator: object, runtimes: list
) -> None:
    name = kube.new_name("startup")
    body = make_example(name)
    body["spec"]["replicas"] = {"min": 1, "max": 16}
    body["spec"]["slo"] = {"ttft": "1s", "tpot": "200ms", "window": "6s"}
    body["spec"]["autoscaling"] = {"enabled": True, "interval": "2s", "scaleDownStabilization": "1m"}
    body["spec"]["batching"]["autotune"] = False  # the replica rule alone is on trial
    kube.apply(body)
    kube.wait_get("deployment", name)
    pod = wait_for("the first runtime pod", lambda: next(iter(kube.items("pods")), None))
    token = wait_for("the admin token", lambda: kube.get("secret", f"{name}-admin-token"))
    admin_token = base64.b64decode(token["data"]["token"]).decode()
    runtime = fake_runtime.FakeRuntime(host=pod_runner.free_loopback_address(), port=8000, admin_token=admin_token)
    runtime.start()
    runtimes.append(runtime)
    # A deep queue on full batches at a steady 2 requests/s: the backlog, not the arrival rate, is the
    # pressure, and it is the same on every tick (the fake pod never drains it).
    runtime.load = fake_runtime.Load(requests_per_s=2, ttft_s=4.0, tpot_s=0.05, waiting=200, running=8,
                                     kv_usage=0.9)  # fmt: skip
    created_s = _epoch_s(pod["metadata"]["creationTimestamp"])
    time.sleep(max(0.0, created_s + STARTUP_S + 1.0 - time.time()))
    _mark_ready(kube, pod["metadata"]["name"], runtime.host)
    ready_s = _epoch_s(kube.get("pod", pod["metadata"]["name"])["status"]["conditions"][0]["lastTransitionTime"])
    learnt_expected = ready_s - created_s

    first = wait_for("the tuner to scale up", lambda: (d := _desired(kube, name)) > 1 and d, timeout_s=60)
    assert first < 16  # room to cascade, so holding still means something
    scaled_at = time.monotonic()
    wait_for("the Deployment to follow", lambda: kube.get("deployment", name)["spec"]["replicas"] == first)

    # The same pressure, tick after tick, while the new pods load (for less than 2 x the learnt start-up):
    # no further scale-up.
    seen = []
    while time.monotonic() - scaled_at < 1.5 * learnt_expected:
        seen.append(_desired(kube, name))
        time.sleep(1.0)
    assert set(seen) == {first}, seen
    status = kube.get("llmservice", name)["status"]
    startup = status["startup"]
    assert startup["observedSeconds"] == pytest.approx(learnt_expected, abs=1.0)
    assert startup["podsObserved"] == 1
    assert startup["loadingReplicas"] == first - 1
    assert startup["stuckReplicas"] == 0
    decisions = [d for d in status["decisions"] if "scale_up" in d["action"]]
    assert len(decisions) == 1, status["decisions"]
    tuner_state = json.loads(kube.get("llmservice", name)["metadata"]["annotations"][names.ANNOTATION_TUNER_STATE])
    assert tuner_state["startup"]["meanS"] == pytest.approx(learnt_expected, abs=1.0)

    # Loading for more than twice the learnt start-up: those pods are not coming soon; they stop counting
    # and the tuner asks for replacements.
    replaced = wait_for("replacements for the stuck pods", lambda: (d := _desired(kube, name)) > first and d,
                        timeout_s=60)  # fmt: skip
    assert replaced > first
    stuck = wait_for("status to show them stuck", lambda: kube.get("llmservice", name)["status"]["startup"].get(
        "stuckReplicas"), timeout_s=30)  # fmt: skip
    assert stuck >= 1
