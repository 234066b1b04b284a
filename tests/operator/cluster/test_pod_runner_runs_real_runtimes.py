"""The demo's kubelet stand-in against the real control plane: the operator's pod runs as a real
`fleetlm-runtime` process, configured from the pod's own ConfigMap and Secret volumes; the pod turns
Ready with the process's address, the runtime serves, and a deleted pod's process is drained and gone.
On a scale-down the deleted pod leaves the endpoints at once, serves through its preStop sleep, then drains:
no request, in flight or new, ever sees its 503."""

from __future__ import annotations

import json
import pathlib
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from fleetlm_dev import pod_runner
from fleetlm_dev.testing import wait_for
from fleetlm_operator.builders import meta

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
            return running.name not in runner.pods and not runner.terminating

        wait_for("the deleted pod's runtime to stop", stopped, timeout_s=60)
        assert running.process.poll() is not None
        assert running.process.returncode == 0  # SIGTERM: drained, exit 0
    finally:
        runner.stop_all()


def _complete(url: str, model: str, max_tokens: int) -> tuple[int, str]:
    """One streamed completion of exactly `max_tokens`: its HTTP status and body (the SSE events, or the error)."""
    payload = {"model": model, "prompt": "hi", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    request = urllib.request.Request(
        url + "/v1/completions", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read().decode(errors="replace")
    except OSError as error:  # refused or reset: no HTTP status at all
        return 0, f"{type(error).__name__}: {error}"


def test_scale_down_leaves_the_endpoints_then_drains_after_the_prestop_sleep(
    kube: Any, make_example: Any, operator: object, tmp_path: pathlib.Path
) -> None:
    name = kube.new_name("down")
    kube.apply(make_example(name, autoscaling={"enabled": False}, replicas={"min": 2, "max": 2}))
    deployment = kube.wait_get("deployment", name)
    selector = ",".join(f"{k}={v}" for k, v in sorted(deployment["spec"]["selector"]["matchLabels"].items()))
    runner = pod_runner.PodRunner(plane=kube.plane, namespace=kube.namespace, selector=selector, directory=tmp_path)
    halt = threading.Event()
    endpoints_seen: list[tuple[float, list[str]]] = []

    def kubelet() -> None:  # the sync loop, as the demo and the e2e suite run it
        while not halt.is_set():
            runner.sync()
            endpoints_seen.append((time.monotonic(), runner.ready_urls()))
            halt.wait(0.3)

    thread = threading.Thread(target=kubelet, daemon=True)
    clients: list[threading.Thread] = []
    results: list[tuple[str, str, int, str]] = []  # (who, url, status, body)
    try:
        thread.start()
        wait_for("two ready runtimes", lambda: len(runner.ready_urls()) == 2, timeout_s=180)
        with urllib.request.urlopen(runner.ready_urls()[0] + "/v1/models", timeout=10) as resp:
            model = json.loads(resp.read())["data"][0]["id"]
        pods = dict(runner.pods)
        assert all(p.pre_stop_s == meta.PRE_STOP_SLEEP_S for p in pods.values())  # read from the pod spec
        assert all(p.grace_s == meta.TERMINATION_GRACE_S for p in pods.values())

        def client() -> None:  # new requests throughout, each to the next endpoint listed ready (a Service)
            turn = 0
            while not halt.is_set():
                urls = runner.ready_urls()
                if urls:
                    url = urls[turn % len(urls)]
                    turn += 1
                    results.append(("new", url, *_complete(url, model, 8)))

        clients.extend(threading.Thread(target=client, daemon=True) for _ in range(2))
        for c in clients:
            c.start()
        kube.patch("llmservice", name, patch={"spec": {"replicas": {"min": 1, "max": 1}}})
        [gone] = wait_for("a pod deleted by the scale-down", lambda: list(runner.terminating), timeout_s=60)
        assert gone.deleted_at is not None
        assert gone.url not in runner.ready_urls()  # out of the endpoints at once
        # A client that picked this endpoint before it left them: served during the preStop sleep...
        sigterm_due = gone.deleted_at + gone.pre_stop_s
        while time.monotonic() < sigterm_due - 1.5:
            results.append(("stale", gone.url, *_complete(gone.url, model, 8)))
        # ...and longer streams it began shortly before the SIGTERM run to their end while the runtime drains.
        streams: list[tuple[float, float]] = []  # (began, ended)

        def stream() -> None:
            began = time.monotonic()
            results.append(("in-flight", gone.url, *_complete(gone.url, model, 1800)))
            streams.append((began, time.monotonic()))

        launched = []
        while time.monotonic() < sigterm_due - 0.3:
            launched.append(threading.Thread(target=stream, daemon=True))
            launched[-1].start()
            time.sleep(0.1)
        for t in launched:
            t.join(timeout=120)
        wait_for("the deleted pod's process to exit", lambda: gone.process.poll() is not None, timeout_s=60)
        wait_for("the terminating pod forgotten", lambda: not runner.terminating, timeout_s=10)
    finally:
        halt.set()
        for t in [thread, *clients]:
            t.join(timeout=60)
        runner.stop_all()

    assert gone.sigterm_at is not None and gone.sigterm_at - gone.deleted_at >= meta.PRE_STOP_SLEEP_S
    assert any(b < gone.sigterm_at < e for b, e in streams), (
        f"none in flight at the SIGTERM ({gone.sigterm_at}): {streams}"
    )
    assert gone.process.returncode == 0  # SIGTERM, drained, exit 0 (no SIGKILL)
    assert not any(gone.url in urls for at, urls in endpoints_seen if at >= gone.deleted_at)
    failed = [(who, url, status, body[:200]) for who, url, status, body in results if status != 200]
    assert not failed, failed
    assert all("[DONE]" in body and '"error"' not in body for *_, body in results)
    assert {who for who, *_ in results} == {"new", "stale", "in-flight"}
    assert sum(url == gone.url for who, url, *_ in results if who == "stale") >= 2
