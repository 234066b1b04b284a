"""Against the real API server with the operator running: `spec.router.enabled` creates the router's
objects with least privilege; where the Gateway API Inference Extension CRDs (taken from its Go module)
are installed, an InferencePool and per-class objectives are created and accepted by their schemas; and
with `min: 0` + `idleTimeout` the service idles to zero and comes back when the router asks through /scale."""

from __future__ import annotations

import asyncio
import os
import pathlib
import subprocess

import pytest

from fleetlm_dev.testing import wait_for
from fleetlm_router import scale

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

GIE_MODULE = "sigs.k8s.io/gateway-api-inference-extension"
POOL_VERSION = "v1.6.2"  # InferencePool inference.networking.k8s.io/v1
OBJECTIVE_VERSION = "v1.1.0"  # the last GIE release with InferenceObjective (x-k8s.io/v1alpha2); now llm-d.ai


def _module_dir(version: str) -> pathlib.Path:
    """The extension's Go module from the module proxy, cached in GOMODCACHE (outside the repository)."""
    env = {**os.environ, "GOFLAGS": "-mod=mod"}
    out = subprocess.run(["go", "mod", "download", "-json", f"{GIE_MODULE}@{version}"], capture_output=True,
                         text=True, env=env, timeout=600, check=True, cwd="/tmp")  # fmt: skip
    import json

    return pathlib.Path(json.loads(out.stdout)["Dir"])


@pytest.fixture(scope="module")
def gie_crds(control_plane) -> None:
    pool = _module_dir(POOL_VERSION) / "config/crd/bases/inference.networking.k8s.io_inferencepools.yaml"
    objective = (
        _module_dir(OBJECTIVE_VERSION) / "config/crd/bases/inference.networking.x-k8s.io_inferenceobjectives.yaml"
    )
    for path in (pool, objective):
        control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    control_plane.kubectl("wait", "--for=condition=Established", "crd/inferencepools.inference.networking.k8s.io",
                          "crd/inferenceobjectives.inference.networking.x-k8s.io", "--timeout=60s")  # fmt: skip


def test_router_objects_pool_and_objectives(gie_crds, operator, kube, make_example) -> None:
    name = kube.new_name("routed")
    qos = {"classes": [{"name": "chat", "priority": 0}, {"name": "tools", "priority": 1},
                       {"name": "batch", "priority": 2, "sheddable": True}], "defaultClass": "chat"}  # fmt: skip
    kube.apply(make_example(name, router={"enabled": True, "hold": {"maxRequests": 7, "timeout": "90s"}}, qos=qos))
    deployment = kube.wait_get("deployment", f"{name}-router")
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[0] == "fleetlm-router" and "--hold-max-requests" in command
    assert kube.wait_get("service", f"{name}-router")["spec"]["selector"]["app.kubernetes.io/component"] == "router"
    kube.wait_get("rolebinding", f"{name}-router")
    sa = f"system:serviceaccount:{kube.namespace}:{name}-router"

    def can(*args: str) -> bool:
        proc = kube.plane.kubectl("auth", "can-i", *args, "-n", kube.namespace, f"--as={sa}", check=False)
        return proc.stdout.strip() == "yes"

    assert can("watch", "endpointslices.discovery.k8s.io")
    assert can("patch", f"llmservices.fleetlm.dev/{name}", "--subresource=scale")
    assert not can("patch", "llmservices.fleetlm.dev/someone-else", "--subresource=scale")
    assert (
        not can("list", "pods") and not can("get", "secrets") and not can("delete", f"llmservices.fleetlm.dev/{name}")
    )

    pool = kube.wait_get("inferencepool", name)
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    assert pool["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "runtime"
    objectives = {o["metadata"]["name"]: o["spec"]["priority"] for o in kube.items("inferenceobjectives")
                  if o["metadata"]["name"].startswith(name)}  # fmt: skip
    assert objectives == {f"{name}-chat": 1, f"{name}-tools": 0, f"{name}-batch": -1}
    status = wait_for("status.endpoint", lambda: (kube.get("llms", name) or {}).get("status", {}).get("endpoint"))
    assert status == f"http://{name}-router.{kube.namespace}.svc"

    kube.patch("llms", name, patch={"spec": {"router": {"enabled": False}}})  # switched off: its objects go
    wait_for("the router's removal", lambda: kube.get("deployment", f"{name}-router") is None)
    wait_for("its Role's removal", lambda: kube.get("role", f"{name}-router") is None)


def test_idle_to_zero_and_back_when_the_router_asks(operator, kube, make_example, control_plane) -> None:
    name = kube.new_name("idle")
    kube.apply(make_example(name, router={"enabled": True}, replicas={"min": 0, "max": 2, "desired": 1,
                                                                      "idleTimeout": "3s"}))  # fmt: skip
    wait_for("one replica", lambda: (kube.get("deployment", name) or {}).get("spec", {}).get("replicas") == 1)
    wait_for("idle to zero", lambda: kube.get("deployment", name)["spec"]["replicas"] == 0, timeout_s=60)
    events = kube.plane.kubectl("get", "events", "-n", kube.namespace, "-o", "json").stdout
    assert "ScaledToZero" in events

    # The router's own scaler, through the /scale subresource, as the router runs it.
    scaler = scale.ApiScaler(namespace=kube.namespace, name=name, kubeconfig=str(control_plane.kubeconfig))
    asyncio.run(scaler.request_scale_up())
    wait_for("back to one", lambda: kube.get("deployment", name)["spec"]["replicas"] == 1, timeout_s=60)
    asyncio.run(scaler.report_activity())  # traffic: the stamp keeps it up for a while
    stamp = kube.get("llms", name)["metadata"]["annotations"][scale.ANNOTATION_LAST_REQUEST]
    assert stamp
    asyncio.run(scaler.request_scale_up())  # already up: a second ask changes nothing
    assert kube.get("llms", name)["spec"]["replicas"]["desired"] == 1
