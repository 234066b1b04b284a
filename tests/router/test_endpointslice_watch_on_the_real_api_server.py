"""The router's replica list from EndpointSlices watched on a real API server, in front of a real runtime:
a ready endpoint gets traffic, one turned not-ready (draining) or deleted gets none and requests are held
until one is ready again."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import aiohttp
import pytest

from fleetlm_dev import bench_router
from fleetlm_router import app as app_mod
from fleetlm_router import endpoints, settings

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _slice(name: str, service: str, address: str, port: str, *, ready: bool) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service,
                                              "endpointslice.kubernetes.io/managed-by": "test.fleetlm.dev"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": int(port), "protocol": "TCP"}],
        "endpoints": [{"addresses": [address], "conditions": {"ready": ready},
                       "targetRef": {"kind": "Pod", "name": "pod-a"}}],
    }  # fmt: skip


async def _wait(what: str, probe: Any, timeout_s: float = 30) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if probe():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _own_address() -> str | None:
    """This machine's first non-loopback IPv4 address (EndpointSlices refuse loopback ones), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # a UDP connect sends nothing: it only picks the route
        except OSError:
            return None
        address = sock.getsockname()[0]
    return None if address.startswith("127.") else address


@pytest.fixture
def replica_on_own_address(tmp_path) -> Any:
    address = _own_address()
    if address is None:
        pytest.skip("no non-loopback IPv4 address to bind a replica to (EndpointSlices refuse loopback)")
    proc = bench_router.start_runtime(tmp_path, bench_router.runtime_config(max_model_len=256), name="own",
                                      host=address)  # fmt: skip
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


async def test_the_watch_follows_ready_endpoints(
    control_plane, namespace, replica_on_own_address, aiohttp_server
) -> None:
    replica = replica_on_own_address

    def kubectl(*args: str, body: dict[str, Any] | None = None) -> None:
        control_plane.kubectl(*args, "-n", namespace, *(["-f", "-"] if body else []),
                              input=json.dumps(body) if body else None)  # fmt: skip

    service = "rt"
    kubectl(
        "apply",
        body={
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": service},
            "spec": {"ports": [{"name": "http", "port": 80}]},
        },
    )  # fmt: skip (no selector: slices are ours)
    address, port = replica.url.removeprefix("http://").rsplit(":", 1)
    kubectl("apply", body=_slice("rt-a", service, address, port, ready=True))
    kubectl("apply", body=_slice("other", "not-rt", address, port, ready=True))  # another Service's slice: ignored

    source = endpoints.EndpointSliceSource(namespace=namespace, service=service, port_name="http",
                                           kubeconfig=str(control_plane.kubeconfig))  # fmt: skip
    cfg = settings.RouterSettings(hold_timeout_s=30, hold_comment_interval_s=0.2)
    server = await aiohttp_server(app_mod.create_app(cfg, source=source))
    state = server.app[app_mod.state_key]
    url = f"http://127.0.0.1:{server.port}"
    await _wait("the ready endpoint", lambda: dict(state.endpoints.replicas) == {"pod-a": replica.url})

    body = {"model": "tiny", "prompt": "hello", "max_tokens": 3}
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/completions", json=body) as resp:
            assert resp.status == 200 and resp.headers["X-FleetLM-Replica"] == "pod-a"

        kubectl("apply", body=_slice("rt-a", service, address, port, ready=False))  # draining: readiness false
        await _wait("the endpoint to leave", lambda: not state.endpoints.replicas)
        held = asyncio.create_task(session.post(url + "/v1/completions", json=body))
        await _wait("a held request", lambda: state.metrics.held._value.get() == 1)
        kubectl("apply", body=_slice("rt-a", service, address, port, ready=True))  # ready again: the held one is served
        resp = await asyncio.wait_for(held, 30)
        assert resp.status == 200, await resp.text()
        resp.release()

        kubectl("delete", "endpointslice", "rt-a")
        await _wait("the deleted slice to leave", lambda: not state.endpoints.replicas)
    assert state.endpoints.synced
