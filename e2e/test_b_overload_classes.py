"""Scenario b: overload at max replicas with critical, standard and sheddable traffic (classes from API keys).

The service runs at its maximum of two replicas; the load is 1.3x what both serve together (measured
first, both at once: on a shared machine less than twice one), 30% of it critical, 30% standard and 40%
sheddable, so that once sheddable is shed the rest is 0.78x capacity. (The generator sent about two thirds
of the rate asked before its arrivals were scheduled on the clock; at a true 1.5x in thirds the rest was
exactly 1.0x, and at 1.5x with this mix 0.9x: the probe does not pay for the 429s, and a probe 10% high,
as one of three on a busy machine is, left standard a backlog that grew all run, and the scheduler's aging,
which keeps a lower class from starving, let it delay critical: p90 1.2 s.) Asserted: sheddable requests
are refused with 429 and a Retry-After header; critical keeps its TTFT target at the SLO's percentile;
standard degrades but is served; no request anywhere gets a 5xx.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from fleetlm_dev import closed_loop

pytestmark = [pytest.mark.e2e, pytest.mark.short]

TARGET_S = 1.0
PERCENTILE = 90.0
KEYS = {"key-critical": "critical", "key-standard": "standard", "key-sheddable": "sheddable"}
WARMUP_S = 5.0  # the first seconds, before admission has seen any TTFT, are not judged
DURATION_S = 40.0
OVERLOAD = 1.3  # times what both replicas serve together
MIX = (("critical", 0.3), ("standard", 0.3), ("sheddable", 0.4))


def test_overload_sheds_sheddable_keeps_critical_serves_standard(
    make_service: Callable[..., closed_loop.Service], service_body: Callable[..., dict[str, Any]]
) -> None:
    qos = {
        "classes": [
            {"name": "critical", "priority": 0},
            {"name": "standard", "priority": 1},
            {"name": "sheddable", "priority": 2, "sheddable": True},
        ],
        "defaultClass": "standard",
    }
    # Batch limits fixed: were the tuner to grow them mid-run, the measured capacity would no longer hold
    # and the "overload" would be served in full (seen on a quiet machine: 1.5x of a 4-seq capacity).
    batching = {"maxBatchSize": 4, "maxBatchTokens": 512, "autotune": False}
    body = service_body(replicas={"min": 2, "max": 2}, qos=qos, batching=batching)
    service = make_service(body, api_keys=KEYS)
    service.start_pods()
    service.wait_ready(2)
    shape = closed_loop.Shape(output_tokens=64)
    capacity = closed_loop.measure_capacity(
        service.ready_urls(), concurrency=4, shape=shape, seconds=6, key="key-standard"
    )
    rate = OVERLOAD * capacity
    print(f"\nb: the two replicas serve {capacity:.2f} req/s; load {rate:.2f} req/s, {MIX}")
    load = closed_loop.Load(
        service.ready_urls,
        shape=shape,
        mix=MIX,
        keys={cls: key for key, cls in KEYS.items()},
    )
    asyncio.run(load.run(lambda _: rate, DURATION_S))

    judged = [r for r in load.records if r.start_s >= load.began_s + WARMUP_S]
    by_class = {cls: [r for r in judged if r.qos_class == cls] for cls in ("critical", "standard", "sheddable")}
    figures: dict[str, Any] = {"capacity_rps": round(capacity, 2), "load_rps": round(rate, 2)}
    for cls, records in by_class.items():
        ttfts = [r.ttft_s for r in records if r.ttft_s is not None]
        p = closed_loop.quantile(ttfts, PERCENTILE / 100)
        figures[cls] = {
            "requests": len(records),
            "served": sum(r.success for r in records),
            "shed_429": sum(r.status == 429 for r in records),
            "ttft_p90_s": round(p, 3) if p is not None else None,
            "attainment_of_served": round(closed_loop.attainment([r for r in records if r.success], TARGET_S) or 0, 3),
        }
    statuses = sorted({r.status for r in load.records})
    figures["statuses"] = statuses
    print(f"b figures: {figures}")

    assert not [r for r in load.records if r.status >= 500], "a request got a 5xx"
    assert all(r.success or r.status == 429 for r in load.records), [r.error for r in load.records if not r.success]
    shed = [r for r in by_class["sheddable"] if r.status == 429]
    assert shed, f"no sheddable request was shed at {OVERLOAD}x the service's capacity"
    assert all(r.retry_after and int(r.retry_after) >= 1 for r in shed)
    assert not [r for r in by_class["critical"] if not r.success], "critical requests were refused"
    critical_served = [r for r in by_class["critical"] if r.success]
    assert closed_loop.attainment(critical_served, TARGET_S) >= PERCENTILE / 100, figures["critical"]
    standard = by_class["standard"]
    assert sum(r.success for r in standard) >= 0.9 * len(standard), figures["standard"]
