"""Scenario a: a surge to about 2.5x one replica's measured capacity.

Each pod is limited to its share of the machine's cores (conftest.pod_cpu_limit), so what one replica
serves is what its share serves, and three replicas serve about three times that: the measured capacity
holds on a quiet and on a busy machine alike. The replica's queue is bounded to about one TTFT target of
its own work (the class's queueLimit, set from the measured capacity and pushed live), so a surge beyond
what is running gets 429 with Retry-After rather than a backlog that would keep TTFT high for minutes after
the new replicas are ready (the Service spreads requests evenly, so the old replica's backlog would only
drain at what it serves beyond its share).

Batches of 8 (fixed, so the measured capacity holds). Phases (the operator's interval is 5 s): steady at
0.3x one replica's capacity for 7 intervals (below the tuner's scale-up occupancy for 8-seq batches, 44%,
so a steady load is not scaled), then the surge at 2.5x until 4 intervals after the new replicas are
ready (how long a pod takes to start on its CPU share depends on the machine: on a busy one, a minute or
more; at most 150 s), then calm at 0.15x (under the scale-down occupancy, 31%). Asserted on measured
figures: zero replica changes during the
steady phase (at least 5 intervals judged); the operator scales out; the TTFT attainment of an interval
(share of the requests that arrived in it served with TTFT within the SLO's target; a 429 misses) is back
at the SLO's percentile within 3 intervals after the new replicas are ready; the replicas come back down to
the minimum after the scale-down stabilization; no request fails but the queue bound's 429s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from fleetlm_dev import closed_loop

# Not in CI's short set: on a 2-core machine shared with other test runs (load average 15 to 18) a new pod
# took 70 to 100 s to start on its CPU share and the steady load was scaled (see the figures it prints).
pytestmark = [pytest.mark.e2e]

INTERVAL_S = 5.0
SLO_WINDOW_S = 15.0  # spec.slo.window
TARGET_S = 1.0  # spec.slo.ttft
PERCENTILE = 90.0  # spec.slo.percentile
STEADY_S = 7 * INTERVAL_S
JUDGED = 3  # intervals after the new replicas are ready within which the SLO must be back
MAX_SURGE_S = 150.0  # the surge ends JUDGED + 1 intervals after the new replicas are ready, or after this
CALM_S = 50.0  # the 15 s stabilization, then one step down per interval (3 -> 1), with room
QUEUE_S = 0.75  # a replica's queue holds about this much of its own work (seconds at its capacity)
BATCH = 8
TIMES_CAPACITY = {"steady": 0.3, "surge": 2.5, "calm": 0.15}


def test_surge_scales_out_recovers_the_slo_and_scales_back(
    make_service: Callable[..., closed_loop.Service], service_body: Callable[..., dict[str, Any]]
) -> None:
    classes = [{"name": "default", "priority": 0}]
    # Measured with autoscaling off (the probe saturates the replica: the tuner would scale out before the
    # steady phase) and batch limits fixed (grown mid-run, they would make the measured capacity wrong).
    body = service_body(qos={"classes": classes, "defaultClass": "default"})
    body["spec"]["batching"].update(maxBatchSize=BATCH, maxBatchTokens=512, autotune=False)
    body["spec"]["autoscaling"]["enabled"] = False
    service = make_service(body)
    service.start_pods()
    shape = closed_loop.Shape(output_tokens=64)
    capacity = closed_loop.measure_capacity(service.ready_urls()[0], concurrency=BATCH, shape=shape, seconds=8)
    queue_limit = max(BATCH, round(capacity * QUEUE_S))
    time.sleep(SLO_WINDOW_S + INTERVAL_S)  # the tuner's window must not hold the probe's saturation
    service.patch({"qos": {"classes": [{**classes[0], "queueLimit": queue_limit}], "defaultClass": "default"},
                   "autoscaling": {"enabled": True}})  # fmt: skip
    pushed_s = service.wait_pushed(lambda cfg: cfg["qos"]["classes"][0].get("queueLimit") == queue_limit)
    assert service.desired_replicas() == 1, "the service scaled before the steady phase"
    rates = {phase: times * capacity for phase, times in TIMES_CAPACITY.items()}
    print(
        f"\na: one replica serves {capacity:.2f} req/s; queue limit {queue_limit} (pushed in {pushed_s:.1f}s); "
        + ", ".join(f"{phase} {value:.2f}" for phase, value in rates.items())
        + " req/s"
    )
    timeline = closed_loop.Timeline(service, INTERVAL_S / 5)
    timeline.start()
    ends: dict[str, float] = {}  # t (s since the load began) the new replicas were ready, and the surge ended

    def rate(t: float) -> float:
        if t < STEADY_S:
            return rates["steady"]
        if "surge" not in ends:
            last = timeline.samples[-1] if timeline.samples else None
            if "ready" not in ends and last and last.desired >= 2 and last.ready >= last.desired:
                ends["ready"] = t
            if ("ready" in ends and t >= ends["ready"] + (JUDGED + 1) * INTERVAL_S) or t >= STEADY_S + MAX_SURGE_S:
                ends["surge"] = t
        return rates["calm"] if "surge" in ends else rates["surge"]

    load = closed_loop.Load(service.ready_urls, shape=shape)
    asyncio.run(load.run(rate, STEADY_S + MAX_SURGE_S + CALM_S, until=lambda t: t >= ends.get("surge", 1e9) + CALM_S))
    timeline.stop()
    samples, began = timeline.samples, load.began_s

    # Steady: no replica change, judged from the second interval on (the first holds the tuner's baseline).
    steady = [s for s in samples if began + INTERVAL_S <= s.t_s < began + STEADY_S]
    # Surge: the operator scaled out; when were the new replicas ready?
    surge_end = began + ends.get("surge", STEADY_S + MAX_SURGE_S)
    peak = max(s.desired for s in samples if s.t_s < surge_end)
    ready_at = began + ends["ready"] if "ready" in ends else None
    windows = closed_loop.per_interval(load.records, ready_at or surge_end, surge_end, INTERVAL_S)
    shares = [closed_loop.attainment(w, TARGET_S) for w in windows]
    recovered = next((i + 1 for i, a in enumerate(shares) if a is not None and a >= PERCENTILE / 100), None)
    surge_records = [r for r in load.records if began + STEADY_S <= r.start_s < surge_end]
    # Calm: back to the minimum once the stabilization has passed.
    last = samples[-1]
    first_min = next((s.t_s for s in samples if s.t_s > surge_end and s.desired == 1), None)
    status = service.status()
    actions = [d.get("action") for d in status.get("decisions") or []]
    refused = [r for r in load.records if r.status == 429]
    per_interval = [(round(s.t_s - began), s.desired, s.ready) for s in samples[:: int(INTERVAL_S)]]
    print(f"a timeline (s, replicas asked, ready): {per_interval}")
    figures = {
        "capacity_rps": round(capacity, 2),
        "queue_limit": queue_limit,
        "steady_intervals_without_change": round((steady[-1].t_s - steady[0].t_s) / INTERVAL_S, 1) if steady else 0,
        "steady_replicas": sorted({s.desired for s in steady}),
        "peak_replicas": peak,
        "new_replicas_ready_s_after_surge": round(ready_at - began - STEADY_S, 1) if ready_at else None,
        "surge_s": round(surge_end - began - STEADY_S, 1),
        "surge_refused_429": sum(r.status == 429 for r in surge_records),
        "attainment_per_interval_after_ready": [None if a is None else round(a, 2) for a in shares],
        "recovery_intervals": recovered,
        "scaled_down_to_min_s_after_surge": round(first_min - surge_end, 1) if first_min else None,
        "replica_minutes": round(closed_loop.replica_minutes(samples), 2),
        "decisions": [a for a in actions if a != "hold"],
        "requests": len(load.records),
        "refused_429": len(refused),
        "refused_429_after_ready": sum(r.start_s >= (ready_at or surge_end) for r in refused),
        "failed_other": sum(not r.success and r.status != 429 for r in load.records),
        "overall_attainment": round(closed_loop.attainment(load.records, TARGET_S) or 0, 3),
    }
    print(f"a figures: {figures}")
    assert figures["steady_intervals_without_change"] >= 5 and len(figures["steady_replicas"]) == 1, figures
    assert peak >= 2, f"the operator did not scale out: {figures}"
    assert ready_at is not None, f"the new replicas were not ready before the surge ended: {figures}"
    assert recovered is not None and recovered <= JUDGED, figures
    assert first_min is not None and last.desired == 1, figures
    assert not [r for r in load.records if r.status >= 500], figures
    assert all(r.success or (r.status == 429 and r.retry_after) for r in load.records), [
        r.error for r in load.records if not r.success and r.status != 429
    ][:5]
