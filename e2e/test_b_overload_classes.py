"""Scenario b: overload at max replicas with critical, standard and sheddable traffic (classes from API keys).

The service runs at its maximum of two replicas; the load is 1.3x what both serve together, 20% of it
critical, 20% standard and 60% sheddable, so that once sheddable is shed the rest is 0.52x capacity. It was
25/25/50 (a rest of 0.65x) until a CI-equivalent run where the probe said 60 req/s and the replicas then
served 42 under the load (this machine's speed drifts by 20-30% within a minute: probes of one replica
gave 20 to 49 req/s): the rest was the whole capacity, standard waited 7.5 s at p90 (15 preemptions/s),
and a request failed otherwise than with 429 (the assertion then printed the refusals first; it now prints
the failed requests).

The capacity is measured first, both replicas at once (on a shared machine less than twice one), with
critical and standard streams in turn, four times as many as a batch holds: the queue stays deep and
critical preempts running standard requests (which recompute later), as under the overload. A probe of one
class with full batches and an empty queue said 66 req/s where the same replicas then served 42 under the
mixed load (server TTFT from the runtime's histogram matched the client's; the load generator's lag was
p99 14 ms), and at a rest of 0.78x the standard backlog admitted before the shed never drained: the queue's
aging (then 5 s a level; 30 s since) gave aged standard requests critical's turn, and critical's p90 reached 3 to 7 s.
`sheddable` is made sheddable only after a tuner window that began after the probe, so that only the load
makes the tuner shed it (the probe's deep queue would have).

Judged from one interval after the tuner sheds sheddable: before that, for a tick or two, every class
queues alike, and the backlog admitted meanwhile takes an interval to drain. Asserted: sheddable requests
are refused with 429 and a Retry-After header; critical keeps its TTFT target at the SLO's percentile;
standard is served (it degrades: its p90 was 1.7 s in a run on a busy machine); no request gets a 5xx. The
figures say where the time went: the load generator's lag behind its schedule, the runtimes' own TTFT per
class, the cores the pods and the harness used, preemptions per second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from fleetlm_dev import closed_loop

pytestmark = [pytest.mark.e2e, pytest.mark.short]

TARGET_S = 1.0
PERCENTILE = 90.0
KEYS = {"key-critical": "critical", "key-standard": "standard", "key-sheddable": "sheddable"}
WARMUP_S = 5.0  # where the tuner never sheds (then the test fails), judged from here
INTERVAL_S = 5.0  # spec.autoscaling.interval
JUDGED_S = 25.0  # seconds of load judged
DURATION_S = 20.0  # the load's rate is reported over its first seconds
MAX_DURATION_S = 60.0
OVERLOAD = 1.3  # times what both replicas serve together
MIX = (("critical", 0.2), ("standard", 0.2), ("sheddable", 0.6))
BATCH = 4  # maxBatchSize, fixed
PROBE_STREAMS = 4 * BATCH  # per replica: the queue stays deep, as once an overload has built a backlog


def test_overload_sheds_sheddable_keeps_critical_serves_standard(
    make_service: Callable[..., closed_loop.Service], service_body: Callable[..., dict[str, Any]]
) -> None:
    qos = {
        "classes": [
            {"name": "critical", "priority": 0},
            {"name": "standard", "priority": 1},
            # Not sheddable during the capacity probe, whose deep queue would have the tuner shed it at once.
            {"name": "sheddable", "priority": 2, "sheddable": False},
        ],
        "defaultClass": "standard",
    }
    # Batch limits fixed: were the tuner to grow them mid-run, the measured capacity would no longer hold
    # and the "overload" would be served in full (seen on a quiet machine: 1.5x of a 4-seq capacity).
    batching = {"maxBatchSize": BATCH, "maxBatchTokens": 512, "autotune": False}
    body = service_body(replicas={"min": 2, "max": 2}, qos=qos, batching=batching)
    service = make_service(body, api_keys=KEYS)
    service.start_pods()
    service.wait_ready(2)
    shape = closed_loop.Shape(output_tokens=64)
    probe_cpu = closed_loop.pods_cpu_s(service), closed_loop.harness_cpu_s(), time.monotonic()
    # Measured with the mix that is served once sheddable is shed (critical and standard alike), twice as many
    # streams as a batch holds: critical preempts standard as under the overload. A probe of one class with
    # full batches and an empty queue measured 66 req/s where the same replicas then served 42 under the load.
    capacity = closed_loop.measure_capacity(
        service.ready_urls(), concurrency=PROBE_STREAMS, shape=shape, seconds=6, keys=("key-critical", "key-standard")
    )
    probe_wall = time.monotonic() - probe_cpu[2]
    probe_cores = (
        round((closed_loop.pods_cpu_s(service) - probe_cpu[0]) / probe_wall, 2),
        round((closed_loop.harness_cpu_s() - probe_cpu[1]) / probe_wall, 2),
    )
    # Sheddable from a tuner window that began after the probe on, so that only the load below makes it shed.
    settled_s = service.wait_window_after(time.time() + 1.0)
    qos["classes"][2]["sheddable"] = True
    service.patch({"qos": qos})
    pushed_s = service.wait_pushed(lambda cfg: cfg["qos"]["classes"][2].get("sheddable") is True)
    print(f"\nb: a clean tuner window {settled_s:.1f}s after the probe, sheddable pushed in {pushed_s:.1f}s")
    rate = OVERLOAD * capacity
    print(f"\nb: the two replicas serve {capacity:.2f} req/s; load {rate:.2f} req/s, {MIX}")
    load = closed_loop.Load(
        service.ready_urls,
        shape=shape,
        mix=MIX,
        keys={cls: key for key, cls in KEYS.items()},
    )
    timeline = closed_loop.Timeline(service, 1.0)
    timeline.start()
    diagnostics = closed_loop.Diagnostics(service)
    diagnostics.start()

    def shed_at() -> float | None:
        """When the tuner's shedding of the sheddable class was in force (status.tuning, written after the push)."""
        return next((s.t_s for s in list(timeline.samples) if "sheddable" in s.shed), None)

    def done(t: float) -> bool:
        shed = shed_at()
        return shed is not None and t >= shed - load.began_s + INTERVAL_S + JUDGED_S

    asyncio.run(load.run(lambda _: rate, MAX_DURATION_S, until=done))
    timeline.stop()
    diagnostics.stop()

    # Judged once the tuner sheds sheddable and one interval has let the backlog it admitted before drain:
    # until then (two or three ticks) every class queues alike; the closed loop's promise is what follows.
    shed = shed_at()
    judged_from = shed + INTERVAL_S if shed is not None else load.began_s + WARMUP_S
    judged = [r for r in load.records if r.start_s >= judged_from]
    by_class = {cls: [r for r in judged if r.qos_class == cls] for cls in ("critical", "standard", "sheddable")}
    figures: dict[str, Any] = {
        "capacity_rps": round(capacity, 2),
        "load_rps": round(closed_loop.arrival_rate(load.records, load.began_s, load.began_s + DURATION_S), 2),
        "shed_after_s": round(shed - load.began_s, 1) if shed is not None else None,
        "judged_s": round(max(r.start_s for r in load.records) - judged_from, 1),
        "critical_attainment_before_judged": round(
            closed_loop.attainment([r for r in load.records if r.qos_class == "critical" and r.start_s < judged_from],
                                   TARGET_S) or 0, 3),
    }  # fmt: skip
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
    # Where the time went: the load generator's lag behind its schedule, the runtimes' own TTFT, the CPU used.
    lags = closed_loop.lag_s(judged)
    figures["send_lag_s"] = {f"p{int(q * 100)}": round(closed_loop.quantile(lags, q) or 0, 3) for q in (0.5, 0.9, 0.99)}
    end_s = max(r.end_s for r in load.records)
    # What the two replicas completed per second while overloaded: their capacity under this load, beside
    # the probe's (and the cores the pods and this process used during the probe: pods, harness).
    figures["served_rps_judged"] = round(
        sum(r.success and judged_from <= r.end_s for r in load.records) / (end_s - judged_from), 2
    )
    figures["probe_cores_pods_harness"] = probe_cores
    figures["diagnostics"] = diagnostics.figures(judged_from, end_s, list(by_class), PERCENTILE / 100)
    print(f"b figures: {figures}")

    assert not [r for r in load.records if r.status >= 500], "a request got a 5xx"
    failed = [r for r in load.records if not r.success and r.status != 429]
    assert not failed, [(r.qos_class, r.status, round(r.start_s - load.began_s, 1), r.error[:120]) for r in failed][:5]
    shed = [r for r in by_class["sheddable"] if r.status == 429]
    assert shed, f"no sheddable request was shed at {OVERLOAD}x the service's capacity"
    assert all(r.retry_after and int(r.retry_after) >= 1 for r in shed)
    assert not [r for r in by_class["critical"] if not r.success], "critical requests were refused"
    critical_served = [r for r in by_class["critical"] if r.success]
    assert closed_loop.attainment(critical_served, TARGET_S) >= PERCENTILE / 100, figures["critical"]
    standard = by_class["standard"]
    assert sum(r.success for r in standard) >= 0.9 * len(standard), figures["standard"]
