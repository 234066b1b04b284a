"""The end-to-end suite: the closed loop on this machine under surges and faults.

Everything is real: the control plane (etcd, kube-apiserver, controller-manager, scheduler on loopback),
the operator as its `fleetlm-operator` console script (as many replicas as a scenario needs, each restarted
when it exits, as a Deployment would), each pod as a `fleetlm-runtime` process run by the kubelet stand-in
(`fleetlm_dev.pod_runner`, which also restarts exited containers), and a load generator that spreads
requests over the ready endpoints (`fleetlm_dev.closed_loop`). Each scenario first measures what one
replica serves on this machine and sizes its load from that, and prints its figures (run with -s to see
them). Run: `make e2e` (all), or `make e2e-short` (a, b and c, which `make test` and so CI run too).
"""

from __future__ import annotations

import pathlib
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fleetlm_dev import closed_loop, cluster, cpu_limits


@pytest.fixture(scope="session")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.ControlPlane]:
    # The whole harness (this process, the control plane, the operators it starts) weighted above the rest
    # of the machine, as the pods are: the scenarios time it, and the load generator measures TTFT on its
    # own clock, so other work on a shared machine must not slow it (CI's machine has none).
    with cpu_limits.weighted_self(), cluster.running(tmp_path_factory.mktemp("control-plane")) as control:
        closed_loop.install_crd(control)
        yield control


@pytest.fixture
def namespace(plane: cluster.ControlPlane) -> Iterator[str]:
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    plane.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def make_service(
    plane: cluster.ControlPlane, namespace: str, tmp_path: pathlib.Path
) -> Iterator[Callable[..., closed_loop.Service]]:
    """`make_service(body, operators=1, api_keys=None)`: the service, its operators and its pods, all
    stopped at teardown (and the logs' tails printed when the test failed)."""
    made: list[closed_loop.Service] = []

    def make(body: dict[str, Any], **kwargs: Any) -> closed_loop.Service:
        service = closed_loop.Service(plane, namespace, body, tmp_path / f"svc-{len(made)}", **kwargs)
        made.append(service)
        return service

    yield make
    for service in made:
        service.close()


def llmservice(name: str = "e2e", **spec: Any) -> dict[str, Any]:
    """The scenarios' service: builtin:tiny, small batches (so one replica saturates at a few streams),
    each pod limited to its share of the machine's cores (`closed_loop.pod_cpu_limit`, so scaling
    out, not the machine's cores, decides the latency), a 5 s tuning interval."""
    body: dict[str, Any] = {
        "apiVersion": "fleetlm.dev/v1alpha1",
        "kind": "LLMService",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": "builtin:tiny", "dtype": "float32"},
            "runtime": {"gpus": 0},
            "replicas": {"min": 1, "max": 3},
            "slo": {"ttft": "1s", "percentile": 90, "window": "15s"},
            "batching": {
                "maxBatchSize": 4,
                "maxBatchTokens": 512,
                "maxBatchSizeRange": {"min": 2, "max": 8},
                "maxBatchTokensRange": {"min": 128, "max": 1024},
            },
            "autoscaling": {"enabled": True, "interval": "5s", "scaleDownStabilization": "15s"},
        },
    }
    for section, value in spec.items():
        body["spec"][section] = value
    limit = closed_loop.pod_cpu_limit(int(body["spec"]["replicas"]["max"]))
    body["spec"]["runtime"].setdefault("resources", {"limits": {"cpu": limit}})
    return body


@pytest.fixture
def service_body() -> Callable[..., dict[str, Any]]:
    return llmservice
