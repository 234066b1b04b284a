"""Scenario e: the API server stopped and started again mid-run, with two operator replicas.

Two replicas serve a load at one replica's measured capacity while kube-apiserver is down for longer
than the operators' Lease (15 s; the leader steps down at 10 s without a renewal). Asserted: the runtimes
keep serving throughout (no request fails: the data path never touches the API server); the operators
reconnect by themselves and status updates resume (the LLMService's status changes again after the
outage); the Lease is renewed again; and at no sampled moment do two operators lead.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from fleetlm_dev import closed_loop, cluster

pytestmark = [pytest.mark.e2e]

LEASE_S = 15
OUTAGE_S = 20.0
RUN_S = 75.0


def test_operators_reconnect_and_runtimes_keep_serving_across_an_outage(
    plane: cluster.ControlPlane,
    make_service: Callable[..., closed_loop.Service],
    service_body: Callable[..., dict[str, Any]],
) -> None:
    service = make_service(service_body(replicas={"min": 2, "max": 3}), operators=2, lease_duration_s=LEASE_S)
    service.start_pods()
    service.wait_ready(2)
    shape = closed_loop.Shape(output_tokens=64)
    capacity = closed_loop.measure_capacity(service.ready_urls()[0], concurrency=4, shape=shape, seconds=6)
    print(f"\ne: one replica serves {capacity:.2f} req/s; load {capacity:.2f} req/s over 2 replicas")
    load = closed_loop.Load(service.ready_urls, shape=shape)
    outage: dict[str, float] = {}
    overlaps: list[list[str]] = []
    done = threading.Event()

    def watch_leaders() -> None:
        while not done.wait(0.3):
            if len(leading := service.leaders()) > 1:
                overlaps.append(leading)

    def take_the_api_down() -> None:
        time.sleep(15)
        outage["rv_before"] = float((service.get("llmservice") or {})["metadata"]["resourceVersion"])
        outage["down"] = time.monotonic()
        plane.stop_component("kube-apiserver")
        time.sleep(OUTAGE_S)
        outage["starting"] = time.monotonic()
        plane.start_component("kube-apiserver")
        outage["up"] = time.monotonic()

    watcher = threading.Thread(target=watch_leaders, daemon=True)
    watcher.start()
    chaos = threading.Thread(target=take_the_api_down, daemon=True)
    chaos.start()
    try:
        asyncio.run(load.run(lambda _: capacity, RUN_S))
        chaos.join(timeout=120)
        # Status updates resume: the object changes again (the tuner's tick writes observed figures).
        rv_after = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            obj = service.get("llmservice") or {}
            if float(obj.get("metadata", {}).get("resourceVersion", 0)) > outage["rv_before"]:
                rv_after = time.monotonic()
                break
            time.sleep(0.5)
        holder, renewed = service.lease_holder()
        time.sleep(LEASE_S / 5 + 1.5)  # more than one renew period
        holder_later, renewed_later = service.lease_holder()
    finally:
        done.set()
        watcher.join(timeout=5)
        if plane.running().get("kube-apiserver") is False:
            plane.start_component("kube-apiserver")

    during = [r for r in load.records if outage["down"] <= r.start_s <= outage["up"]]
    figures = {
        "capacity_rps": round(capacity, 2),
        "outage_s": round(outage["up"] - outage["down"], 1),
        "requests_during_outage": len(during),
        "failed_during_outage": sum(not r.success for r in during),
        "failed_total": sum(not r.success for r in load.records),
        "status_updated_s_after_api_back": round(rv_after - outage["up"], 1) if rv_after else None,
        "lease": {"holder": holder_later, "renewing": renewed_later != renewed},
        "operator_restarts": [op.restarts for op in service.operators],
        "leader_overlaps": len(overlaps),
    }
    print(f"e figures: {figures}")
    assert during and figures["failed_total"] == 0, [r.error for r in load.records if not r.success][:5]
    assert rv_after is not None, "no status update after the API server came back"
    assert holder == holder_later and renewed_later != renewed, "the Lease is not renewed after the outage"
    assert not overlaps, f"two operators led at once: {overlaps[:3]}"
