"""Scenario c: runtime processes killed with SIGKILL mid-load, the server and, separately, its engine child.

Two replicas serve a load sized at 0.4x one replica's measured capacity (so either can take it all while the
other recovers). Mid-load, once the pod has streams in flight (a replica holding its CPU share finishes a
stream in a tenth of a second at that load, so an instant picked blind often finds none), pod A's
`fleetlm-runtime` server is SIGKILLed (its engine child must die with it at once), and later pod B's engine child is
(its server must fail the in-flight streams and exit). Then: every stream in flight on the killed pod ended
within a bound (an error event or a closed connection: no client waits on), the pods came back (the kubelet
stand-in restarts exited containers, as restartPolicy Always does), requests after the recovery all succeed,
and once idle every replica's KV usage reads zero.
"""

from __future__ import annotations

import asyncio
import math
import os
import pathlib
import select
import signal
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from fleetlm_dev import closed_loop, testing

pytestmark = [pytest.mark.e2e, pytest.mark.short]

STREAM_END_BOUND_S = 5.0  # after a kill, the longest any client may wait for its stream to end
DETECT_S = 3.0  # a Service needs about this long to drop a dead endpoint; arrivals meanwhile may fail


def _engine_child(server_pid: int) -> int:
    for child in testing.children_of(server_pid):
        if b"resource_tracker" not in pathlib.Path(f"/proc/{child}/cmdline").read_bytes():
            return child
    raise AssertionError(f"no engine process under {server_pid}")


def _exit_times(pidfds: dict[int, int], timeout_s: float) -> dict[int, float]:
    """pid -> time.monotonic() of its exit, from pidfds (pidfd -> pid) opened before the kill: the kernel
    reports the exit itself, whenever this thread gets to run on a busy machine."""
    times: dict[int, float] = {}
    deadline = time.monotonic() + timeout_s
    while pidfds and (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select(list(pidfds), [], [], left)
        now = time.monotonic()
        for fd in ready:
            times[pidfds.pop(fd)] = now
            os.close(fd)
    for fd in pidfds:
        os.close(fd)
    return times


async def _until_streaming(load: closed_loop.Load, url: str, *, timeout_s: float = 10.0) -> None:
    """Wait (at most `timeout_s`) until a request to `url` began 20 to 60 ms ago (sent, and with most of its
    stream to come) and has not finished, so that a kill now cuts a stream; the assertions say so if none
    was."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = time.monotonic()
        if any(u == url and 0.02 < now - began < 0.06 for u, began in list(load.inflight.values())):
            return
        await asyncio.sleep(0.002)


def _kv_usage(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("fleetlm_kv_cache_usage_perc{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{url}/metrics has no fleetlm_kv_cache_usage_perc")


def test_killed_runtimes_end_their_streams_and_recover(
    make_service: Callable[..., closed_loop.Service], service_body: Callable[..., dict[str, Any]]
) -> None:
    service = make_service(
        service_body(replicas={"min": 2, "max": 2}, autoscaling={"enabled": False, "interval": "5s"})
    )
    service.start_pods()
    service.wait_ready(2)
    assert service.runner is not None
    shape = closed_loop.Shape(output_tokens=64)
    capacity = closed_loop.measure_capacity(service.ready_urls()[0], concurrency=4, shape=shape, seconds=6)
    rate = 0.4 * capacity  # either replica alone can take it all while the other one recovers
    print(f"\nc: one replica serves {capacity:.2f} req/s; load {rate:.2f} req/s over 2 replicas")

    pods = sorted(service.runner.pods.values(), key=lambda p: p.name)
    pod_a, pod_b = pods[0], pods[1]
    kills: dict[str, float] = {}
    orphan: dict[str, float] = {}

    async def kill_server(after_s: float) -> None:
        await asyncio.sleep(after_s)
        await _until_streaming(load, pod_a.url)
        server_pid = pod_a.process.pid
        engine_pid = _engine_child(server_pid)
        pidfds = {os.pidfd_open(server_pid): server_pid, os.pidfd_open(engine_pid): engine_pid}
        kills["server"] = time.monotonic()
        os.kill(server_pid, signal.SIGKILL)
        exits = await asyncio.to_thread(_exit_times, pidfds, 10.0)
        gone = exits.get(engine_pid, math.inf)
        orphan["engine outlived its server by s"] = gone - exits.get(server_pid, kills["server"])
        orphan["engine gone after the kill s"] = gone - kills["server"]

    async def kill_engine(after_s: float) -> None:
        await asyncio.sleep(after_s)
        await _until_streaming(load, pod_b.url)
        engine_pid = _engine_child(pod_b.process.pid)
        kills["engine"] = time.monotonic()
        os.kill(engine_pid, signal.SIGKILL)

    load = closed_loop.Load(service.ready_urls, shape=shape)

    async def scenario() -> None:
        await asyncio.gather(load.run(lambda _: rate, 30.0), kill_server(6.0), kill_engine(16.0))

    asyncio.run(scenario())

    # Recovery: both pods restarted by the kubelet stand-in and serving again.
    recovered = service.wait_ready(2, timeout_s=120)
    assert pod_a.restarts >= 1 and pod_b.restarts >= 1, service.events[-10:]
    assert orphan["engine outlived its server by s"] < 1.0, orphan

    figures: dict[str, Any] = {"capacity_rps": round(capacity, 2), "requests": len(load.records)}
    for what, pod in (("server", pod_a), ("engine", pod_b)):
        killed = kills[what]
        hit = [r for r in load.records if r.url == pod.url and r.start_s < killed < r.end_s]
        # In flight by the client's clock; one whose last token had left the server before the kill ends
        # in success a moment later (the client reads it late). The others were cut.
        cut = [r for r in hit if not r.success]
        assert cut, f"no stream was in flight on the pod whose {what} was killed: {len(hit)} ended in success"
        waits = [r.end_s - killed for r in hit]
        assert max(waits) < STREAM_END_BOUND_S, f"a client waited {max(waits):.1f}s after the {what} kill"
        back = next((t for t, e in service.events if t > killed and pod.name in e and "ready on" in e), None)
        figures[f"{what}_kill"] = {
            "streams_cut": len(cut),
            "in_flight_that_finished": len(hit) - len(cut),
            "longest_wait_s": round(max(waits), 2),
            "errors": sorted({r.error[:60] for r in cut}),
            "ready_again_after_s": round(back - killed, 1) if back else None,
        }
    # Outside the killed pods' in-flight streams and the Service's detection lag, nothing failed.
    killed_pods = {"server": pod_a.url, "engine": pod_b.url}
    stray = [
        r for r in load.records
        if not r.success
        and not any(r.url == url and r.start_s < kills[w] + DETECT_S and r.end_s > kills[w]
                    for w, url in killed_pods.items())
    ]  # fmt: skip
    t0 = load.began_s
    for t, e in service.events:
        print(f"  t={t - t0:6.2f}s {e[:140]}")
    assert not stray, (
        {w: round(k - t0, 2) for w, k in kills.items()},
        {"a": pod_a.url, "b": pod_b.url},
        [(r.url, round(r.start_s - t0, 2), r.status, r.error[:80]) for r in stray[:5]],
        [(round(t - t0, 2), e[:100]) for t, e in service.events if t > t0],
    )
    # Both pods back: new requests all succeed, on both.
    fresh = closed_loop.Load(service.ready_urls, shape=shape, seed=11)
    asyncio.run(fresh.run(lambda _: rate, 8.0))
    after = fresh.records
    figures["after_recovery"] = {"requests": len(after), "failed": sum(not r.success for r in after)}
    assert len(after) >= 5 and all(r.success for r in after), (len(after), [r.error for r in after][:5])
    assert {r.url for r in after} == {pod_a.url, pod_b.url}
    figures["failed_total"] = sum(not r.success for r in load.records)
    figures["both_ready_again_s_after_the_load"] = round(recovered, 1)

    # Idle: no KV left reserved anywhere (aborted and failed requests released theirs).
    time.sleep(2)
    usage = {url: _kv_usage(url) for url in service.ready_urls()}
    figures["idle_kv_usage"] = usage
    assert all(v == 0.0 for v in usage.values()), usage
    figures.update(orphan)
    print(f"c figures: {figures}")
