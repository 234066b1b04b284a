"""spec.model.cache against the real control plane, with pods run by the kubelet stand-in as real processes.

A fill Job's pod runs `python -m fleetlm_runtime.models.fill` for real, copying a local checkpoint into
the directory that stands in for the claim, and patches its progress through the API server with a
token of its own ServiceAccount (so the Role the operator made is what lets it). The runtime pods run
only after the cache is Ready, mount the claim read-only and serve from it; a second replica does not
fill again. A bad source fails once (the pod failure policy, no retries), with a reason, a condition
and an Event, and never starts a pod. Deleting the LLMService keeps the claim (Retain) or deletes it
(Delete) as the spec says.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from fleetlm_dev import pod_runner
from fleetlm_dev.testing import wait_for
from fleetlm_operator.api import names, spec_models
from fleetlm_operator.builders import model_cache
from fleetlm_runtime.models import builtin, fill

pytestmark = pytest.mark.cluster

FILL_BYTES_PER_S = 256 * 1024  # the tiny checkpoint (~0.8 MB) then fills in about 3 s: long enough to watch


@pytest.fixture
def checkpoint() -> Iterator[pathlib.Path]:
    """The built-in tiny model saved as a safetensors checkpoint, outside /tmp (which pods mount as their own)."""
    root = pathlib.Path.home() / ".cache" / "fleetlm" / "test-checkpoints" / uuid.uuid4().hex[:8]
    directory = root / "tiny-ckpt"
    model, tokenizer = builtin.build("tiny", dtype=torch.float32)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    try:
        yield directory
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _cache_spec(**overrides: Any) -> dict[str, Any]:
    return {"size": "1Gi", "fill": {"timeout": "5m", "retries": 2}, **overrides}


def _status(kube: Any, name: str) -> dict[str, Any]:
    found = kube.get("llmservice", name)
    return dict((found or {}).get("status") or {})


def _conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions", [])}


def _events(kube: Any, name: str) -> dict[str, dict[str, Any]]:
    return {e["reason"]: e for e in kube.items("events") if e["involvedObject"]["name"] == name}


def _pods(kube: Any, component: str) -> list[dict[str, Any]]:
    return [p for p in kube.items("pods") if p["metadata"]["labels"].get(names.LABEL_COMPONENT) == component]


def test_the_job_fills_the_cache_once_and_pods_serve_from_it(
    kube: Any, make_example: Any, operator: object, tmp_path: pathlib.Path, checkpoint: pathlib.Path,
    *, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv(fill.ENV_MAX_BYTES_PER_S, str(FILL_BYTES_PER_S))  # inherited by the fill process
    name = kube.new_name("cached")
    body = make_example(name, autoscaling={"enabled": False})
    body["spec"]["model"] = {"source": str(checkpoint), "dtype": "float32", "cache": _cache_spec()}
    kube.apply(body)

    # Nothing runs the Job's pod yet: the cache is Pending and no runtime pod may exist.
    pending = wait_for("status.modelCache", lambda: _status(kube, name).get("modelCache"), timeout_s=60)
    assert pending["phase"] == "Pending"
    [job] = kube.items("jobs")
    assert job["metadata"]["name"] == pending["jobName"]
    assert kube.get("pvc", pending["claimName"]) is not None
    assert kube.get("deployment", name) is None
    assert _conditions(_status(kube, name))[names.ConditionType.MODEL_CACHE_READY]["status"] == "False"

    runner = pod_runner.PodRunner(plane=kube.plane, namespace=kube.namespace,
                                  selector=f"{names.LABEL_LLMSERVICE}={name}", directory=tmp_path)  # fmt: skip
    seen: list[dict[str, Any]] = []
    try:
        started = time.monotonic()

        def cache_ready() -> bool:
            runner.sync()
            cache = _status(kube, name).get("modelCache") or {}
            if cache and (not seen or seen[-1] != cache):
                seen.append(cache)
                if cache["phase"] == "Filling":  # while it fills, still no Deployment
                    assert kube.get("deployment", name) is None
            return cache.get("phase") == "Ready"

        wait_for("the cache to be Ready", cache_ready, timeout_s=120)
        fill_s = time.monotonic() - started
        ready = seen[-1]
        total = sum(p.stat().st_size for p in checkpoint.iterdir())
        assert ready["bytesTotal"] == ready["bytesDone"] == total
        filling = [c for c in seen if c["phase"] == "Filling" and 0 < c.get("bytesDone", 0) < total]
        assert filling, f"no Filling status with bytes in between: {seen}"
        assert seen[0]["phase"] in ("Pending", "Filling")
        # The fill wrote the claim's directory whole, with its manifest.
        volume = tmp_path / "volumes" / kube.namespace / ready["claimName"]
        content = volume / model_cache.content_dir(spec_models.ModelSpec(source=str(checkpoint)))
        manifest = json.loads((content / fill.MANIFEST_NAME).read_text())
        assert manifest["bytesTotal"] == total
        assert kube.get("job", ready["jobName"])["status"]["succeeded"] == 1

        # Now the Deployment exists and its pod mounts the claim read-only and serves the checkpoint.
        deployment = kube.wait_get("deployment", name)
        pod_spec = deployment["spec"]["template"]["spec"]
        [container] = pod_spec["containers"]
        assert {"name": "model-cache", "mountPath": model_cache.CACHE_MOUNT, "readOnly": True} in container[
            "volumeMounts"
        ]
        volumes = {v["name"]: v for v in pod_spec["volumes"]}
        assert volumes["model-cache"]["persistentVolumeClaim"] == {"claimName": ready["claimName"], "readOnly": True}
        startup = container["startupProbe"]
        assert startup["httpGet"]["path"] == "/ready"
        assert startup["periodSeconds"] * startup["failureThreshold"] == model_cache.startup_budget_s(total)

        wait_for("a runtime pod serving from the cache", lambda: runner.sync() is not None and runner.ready_urls(),
                 timeout_s=120)  # fmt: skip
        [url] = runner.ready_urls()
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as resp:
            assert json.loads(resp.read())["data"][0]["id"] == checkpoint.name
        request = urllib.request.Request(
            url + "/v1/completions",
            data=json.dumps({"model": checkpoint.name, "prompt": "hi", "max_tokens": 3}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert json.loads(resp.read())["usage"]["completion_tokens"] == 3

        status = _status(kube, name)
        assert _conditions(status)[names.ConditionType.MODEL_CACHE_READY]["status"] == "True"
        events = _events(kube, name)
        assert {"ModelCacheFilling", "ModelCacheReady"} <= events.keys(), sorted(events)

        # Scaling out mounts the same claim: no second Job, no second fill.
        kube.patch("llmservice", name, patch={"spec": {"replicas": {"desired": 2}}})
        wait_for("two runtime pods serving", lambda: runner.sync() is not None and len(runner.ready_urls()) == 2,
                 timeout_s=120)  # fmt: skip
        assert len(kube.items("jobs")) == 1
        assert len(_pods(kube, names.COMPONENT_MODEL_CACHE)) == 1
        # To the real stderr: the in-process operator (KopfRunner) captures sys.stdout and sys.stderr.
        print(f"\ncache fill observed Pending->Ready in {fill_s:.1f}s; statuses seen: "
              f"{[(c['phase'], c.get('bytesDone')) for c in seen]}", file=sys.__stderr__)  # fmt: skip
    finally:
        runner.stop_all()


def test_a_bad_source_fails_once_with_a_reason_and_never_starts_pods(
    kube: Any, make_example: Any, operator: object, tmp_path: pathlib.Path
) -> None:
    name = kube.new_name("badsrc")
    body = make_example(name, autoscaling={"enabled": False})
    body["spec"]["model"] = {"source": "/nowhere/no-such-model", "cache": _cache_spec()}  # whenDeleted: Retain
    kube.apply(body)
    runner = pod_runner.PodRunner(plane=kube.plane, namespace=kube.namespace,
                                  selector=f"{names.LABEL_LLMSERVICE}={name}", directory=tmp_path)  # fmt: skip
    try:
        started = time.monotonic()

        def failed() -> dict[str, Any] | None:
            runner.sync()
            cache = _status(kube, name).get("modelCache") or {}
            return cache if cache.get("phase") == "Failed" else None

        cache = wait_for("the cache to be Failed", failed, timeout_s=120)
        failed_s = time.monotonic() - started
        assert cache["reason"] == "SourceNotFound"
        assert "/nowhere/no-such-model" in cache["message"]
        status = _status(kube, name)
        conditions = _conditions(status)
        assert conditions[names.ConditionType.MODEL_CACHE_READY]["status"] == "False"
        assert conditions[names.ConditionType.MODEL_CACHE_READY]["reason"] == "SourceNotFound"
        assert conditions[names.ConditionType.READY]["reason"] == "ModelCacheFailed"
        assert status["phase"] == "Failed"
        event = wait_for("the ModelCacheFailed event", lambda: _events(kube, name).get("ModelCacheFailed"))
        assert event["type"] == "Warning"
        assert "SourceNotFound" in event["message"]
        job = kube.get("job", cache["jobName"])
        assert job is not None and job["status"].get("failed") == 1
        assert any(c["type"] == "Failed" and c["reason"] == "PodFailurePolicy" for c in job["status"]["conditions"])

        # No retry of a permanent failure, no crash loop, no runtime pod: it stays that way.
        time.sleep(5)
        runner.sync()
        assert len(_pods(kube, names.COMPONENT_MODEL_CACHE)) == 1
        assert _pods(kube, names.COMPONENT_RUNTIME) == []
        assert kube.get("deployment", name) is None
        assert len(kube.items("jobs")) == 1

        # whenDeleted: Retain (the default): the claim outlives the LLMService; the Job does not.
        claim = kube.get("pvc", cache["claimName"])
        assert claim is not None and not claim["metadata"].get("ownerReferences")
        kube.plane.kubectl("delete", "llmservice", name, "-n", kube.namespace, "--wait=true", "--timeout=60s")
        wait_for("the Job to be garbage-collected", lambda: not kube.items("jobs"), timeout_s=120)
        assert kube.get("pvc", cache["claimName"]) is not None
        print(f"\nbad source: Failed in {failed_s:.1f}s after 1 attempt", file=sys.__stderr__)
    finally:
        runner.stop_all()


def test_when_deleted_delete_takes_the_claim_with_the_llmservice(
    kube: Any, make_example: Any, operator: object
) -> None:
    name = kube.new_name("delpvc")
    body = make_example(name, autoscaling={"enabled": False})
    body["spec"]["model"] = {"source": "/nowhere/model", "cache": _cache_spec()}
    kube.apply(body)
    claim_name = wait_for("status.modelCache", lambda: _status(kube, name).get("modelCache"))["claimName"]
    uid = kube.get("llmservice", name)["metadata"]["uid"]
    assert not kube.wait_get("pvc", claim_name)["metadata"].get("ownerReferences")

    # Switching to Delete makes the LLMService the claim's owner (and garbage collection does the rest).
    body["spec"]["model"]["cache"]["whenDeleted"] = "Delete"
    kube.apply(body)

    def owned() -> bool:
        refs = (kube.get("pvc", claim_name) or {}).get("metadata", {}).get("ownerReferences") or []
        return any(ref["uid"] == uid for ref in refs)

    wait_for("the claim to be owned by the LLMService", owned, timeout_s=60)
    kube.plane.kubectl("delete", "llmservice", name, "-n", kube.namespace, "--wait=true", "--timeout=60s")
    wait_for("the claim to be deleted", lambda: kube.get("pvc", claim_name) is None, timeout_s=150)
