"""Scenario f: spec changes under load.

Two replicas serve a load at 0.4x one replica's measured capacity (either can take it all while the
other is replaced). First the batch bounds change: tuned live (the operator pushes them to the runtimes'
admin API), so no pod may restart: the same pods, the same processes, no restarts. Then the image changes:
the Deployment rolls its pods, and each old pod's runtime drains on SIGTERM (as after its preStop pause),
so every stream in flight finishes: no request fails during the roll (how far the roll got in 105 s is
printed: on a busy machine each new pod takes tens of seconds to load).

A change of the QoS classes must not restart pods either: the operator pushes the new class table to the
running runtimes, which swap it at once. Under load, classes are added and reweighted (the default class
among them), then one is removed; after each change every pod reports the new table (its
`fleetlm_config_info`), the same pods and processes still run, and no request fails.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from fleetlm_dev import closed_loop

pytestmark = [pytest.mark.e2e]

RUN_S = 130.0  # the roll starts two pods one after the other; each takes tens of seconds here


def _pods(service: closed_loop.Service) -> dict[str, tuple[str, int | None, int]]:
    """Pod name -> (uid, runtime PID, restarts), as the kubelet stand-in runs them."""
    assert service.runner is not None
    proc = service.plane.kubectl("get", "pods", "-n", service.namespace, "-l", service.runner.selector, "-o", "json")
    listed = [p for p in json.loads(proc.stdout)["items"] if not p["metadata"].get("deletionTimestamp")]
    pods = {}
    for pod in listed:
        name = pod["metadata"]["name"]
        running = service.runner.pods.get(name)
        pid = running.process.pid if running is not None else None
        pods[name] = (pod["metadata"]["uid"], pid, running.restarts if running is not None else 0)
    return pods


def _classes_in_force(url: str) -> str:
    """The class names a runtime has in force, as its `fleetlm_config_info` says (sorted by priority)."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("fleetlm_config_info{"):
                return line.split('qos_classes="', 1)[1].split('"', 1)[0]
    raise AssertionError(f"{url}/metrics has no fleetlm_config_info")


def _patch(service: closed_loop.Service, patch: dict[str, Any]) -> None:
    service.plane.kubectl(
        "patch", "llmservice", service.name, "-n", service.namespace, "--type=merge", "-p", json.dumps(patch)
    )  # fmt: skip


def test_batch_bounds_never_restart_pods_and_an_image_change_drains(
    make_service: Callable[..., closed_loop.Service], service_body: Callable[..., dict[str, Any]]
) -> None:
    batching = {"batching": {"maxBatchSize": 6, "maxBatchSizeRange": {"min": 2, "max": 6}}}
    _scenario(make_service, service_body, [(batching, None)], roll=True)


def test_class_changes_never_restart_pods(
    make_service: Callable[..., closed_loop.Service], service_body: Callable[..., dict[str, Any]]
) -> None:
    # The load runs in the default class throughout (no key, no header): it is reweighted and retargeted,
    # never removed, so every request has a class; the removal of a class with requests admitted is the
    # runtime's unit test (tests/runtime/server/test_admin_swaps_the_class_table_live.py).
    added = {"qos": {"classes": [
        {"name": "default", "priority": 0, "weight": 3, "slo": {"ttft": "2s"}},
        {"name": "standard", "priority": 1, "weight": 2},
        {"name": "bulk", "priority": 5, "sheddable": True},
    ], "defaultClass": "default"}}  # fmt: skip
    removed = {"qos": {"classes": [{"name": "default", "priority": 0, "weight": 1}, {"name": "bulk", "priority": 5,
                                                                                   "sheddable": True}],
                       "defaultClass": "default"}}  # fmt: skip
    _scenario(make_service, service_body, [(added, "default,standard,bulk"), (removed, "default,bulk")], roll=False)


def _scenario(
    make_service: Callable[..., closed_loop.Service],
    service_body: Callable[..., dict[str, Any]],
    changes: list[tuple[dict[str, Any], str | None]],
    *,
    roll: bool,
) -> None:
    service = make_service(service_body(replicas={"min": 2, "max": 2}, autoscaling={"enabled": False}))
    service.start_pods()
    service.wait_ready(2)
    shape = closed_loop.Shape(output_tokens=64)
    capacity = closed_loop.measure_capacity(service.ready_urls()[0], concurrency=4, shape=shape, seconds=6)
    rate = 0.4 * capacity
    print(f"\nf: one replica serves {capacity:.2f} req/s; load {rate:.2f} req/s over 2 replicas; changes {changes}")
    load = closed_loop.Load(service.ready_urls, shape=shape)
    figures: dict[str, Any] = {"capacity_rps": round(capacity, 2)}

    def change_specs() -> None:
        time.sleep(8)
        before = _pods(service)
        figures["_before"] = before
        figures["classes_in_force"] = []
        for tuning, classes in changes:
            changed_at = time.monotonic()
            _patch(service, {"spec": tuning})
            if classes is None:
                time.sleep(12)  # reconcile and push, with room to spare
            else:  # the push reaches every pod within an interval or two (5 s each)
                urls = service.ready_urls()
                while time.monotonic() - changed_at < 30 and any(_classes_in_force(u) != classes for u in urls):
                    time.sleep(0.5)
                in_force = sorted({_classes_in_force(u) for u in urls})
                figures["classes_in_force"].append((in_force, round(time.monotonic() - changed_at, 1)))
        figures["pods_after_tuning_change_unchanged"] = _pods(service) == before
        if not roll:
            return
        rolled_at = time.monotonic()
        _patch(service, {"spec": {"runtime": {"image": "registry.invalid/fleetlm/runtime:rolled"}}})
        deadline = time.monotonic() + 105
        while time.monotonic() < deadline:
            now = _pods(service)
            figures["old_pods_replaced"] = len(set(before) - set(now))
            if len(now) == 2 and not set(now) & set(before) and len(service.ready_urls()) == 2:
                figures["roll_s"] = round(time.monotonic() - rolled_at, 1)
                break
            time.sleep(0.5)

    changer = threading.Thread(target=change_specs, daemon=True)
    changer.start()
    asyncio.run(load.run(lambda _: rate, RUN_S if roll else 8.0 + 35.0 * len(changes)))
    changer.join(timeout=120)
    before = figures.pop("_before")
    figures["requests"] = len(load.records)
    figures["failed"] = sum(not r.success for r in load.records)
    drained = [e for _, e in service.events if "drained" in e or "deleted" in e]
    figures["pods_drained"] = len(drained)
    print(f"f figures: {figures}")

    assert figures["pods_after_tuning_change_unchanged"], f"a tuning change restarted pods (before: {before})"
    for (_, classes), (in_force, _) in zip(changes, figures["classes_in_force"], strict=False):
        assert in_force == [classes], f"the pods run classes {in_force}, not {classes}: the change was not pushed"
    assert len(figures["classes_in_force"]) == len([c for _, c in changes if c is not None]), figures
    if roll:  # the roll began (an old pod drained and gone); on a busy 2-core machine it may not end in time
        assert figures.get("old_pods_replaced", 0) >= 1, "the image change did not roll the pods"
    assert figures["failed"] == 0, [r.error for r in load.records if not r.success][:5]
