"""Scenario a: a surge to about 2.5x one replica's measured capacity.

Phases (the operator's interval is 5 s): steady at half of one replica's capacity for 6 intervals, then
the surge, then calm again at a third. Asserted on measured figures: zero replica changes during the
steady phase; the operator scales out; the TTFT attainment of an interval (share of requests with TTFT
within the SLO's target) is back at the SLO's percentile within 3 intervals after the new replicas are
ready; and the replicas come back down to the minimum after the scale-down stabilization.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from fleetlm_dev import closed_loop

# Not in CI's short set yet: on a 2-core machine shared with other work, three replicas cannot serve
# 2.5x what one serves alone, so the TTFT recovery assertion fails there (see the figures it prints).
pytestmark = [pytest.mark.e2e]

INTERVAL_S = 5.0
TARGET_S = 1.0  # spec.slo.ttft
PERCENTILE = 90.0  # spec.slo.percentile
STEADY_S = 6 * INTERVAL_S
SURGE_S = 60.0
CALM_S = 45.0  # the 15 s stabilization, then time for the scale-down to land


def test_surge_scales_out_recovers_the_slo_and_scales_back(
    make_service: Callable[..., closed_loop.Service], service_body: Callable[..., dict[str, Any]]
) -> None:
    service = make_service(service_body())
    service.start_pods()
    shape = closed_loop.Shape(output_tokens=64)
    capacity = closed_loop.measure_capacity(service.ready_urls()[0], concurrency=4, shape=shape, seconds=8)
    rates = (0.5 * capacity, 2.5 * capacity, capacity / 3)
    print(
        f"\na: one replica serves {capacity:.2f} req/s; steady {rates[0]:.2f}, surge {rates[1]:.2f}, "
        f"calm {rates[2]:.2f} req/s"
    )

    def rate(t: float) -> float:
        if t < STEADY_S:
            return rates[0]
        return rates[1] if t < STEADY_S + SURGE_S else rates[2]

    timeline = closed_loop.Timeline(service, INTERVAL_S / 5)
    timeline.start()
    load = closed_loop.Load(service.ready_urls, shape=shape)
    asyncio.run(load.run(rate, STEADY_S + SURGE_S + CALM_S))
    timeline.stop()
    samples, began = timeline.samples, load.began_s

    # Steady: at least 5 intervals without a replica change.
    steady = [s for s in samples if began + INTERVAL_S <= s.t_s < began + STEADY_S]
    assert steady and len({s.desired for s in steady}) == 1, [s.desired for s in steady]
    # Surge: the operator scaled out; when were the new replicas ready?
    surge_end = began + STEADY_S + SURGE_S
    peak = max(s.desired for s in samples if s.t_s < surge_end)
    assert peak >= 2, "the operator did not scale out"
    ready_at = next(s.t_s for s in samples if s.t_s > began + STEADY_S and s.ready >= peak)
    windows = closed_loop.per_interval(load.records, ready_at, surge_end, INTERVAL_S)
    shares = [closed_loop.attainment(w, TARGET_S) for w in windows]
    recovered = next((i + 1 for i, a in enumerate(shares) if a is not None and a >= PERCENTILE / 100), None)
    # Calm: back to the minimum once the stabilization has passed.
    last = samples[-1]
    first_min = next((s.t_s for s in samples if s.t_s > surge_end and s.desired == 1), None)
    replica_minutes = closed_loop.replica_minutes(samples)
    status = service.status()
    actions = [d.get("action") for d in status.get("decisions") or []]
    figures = {
        "capacity_rps": round(capacity, 2),
        "steady_intervals_without_change": round((steady[-1].t_s - steady[0].t_s) / INTERVAL_S, 1),
        "peak_replicas": peak,
        "new_replicas_ready_s_after_surge": round(ready_at - began - STEADY_S, 1),
        "attainment_per_interval_after_ready": [None if a is None else round(a, 2) for a in shares],
        "recovery_intervals": recovered,
        "scaled_down_to_min_s_after_surge": round(first_min - surge_end, 1) if first_min else None,
        "replica_minutes": round(replica_minutes, 2),
        "decisions": [a for a in actions if a != "hold"],
        "requests": len(load.records),
        "failed": sum(not r.success for r in load.records),
        "overall_attainment": round(closed_loop.attainment(load.records, TARGET_S) or 0, 3),
    }
    print(f"a figures: {figures}")
    assert recovered is not None and recovered <= 3, figures
    assert first_min is not None and last.desired == 1, figures
    assert figures["failed"] == 0, [r.error for r in load.records if not r.success][:5]
