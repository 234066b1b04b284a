"""The demo's calm phase in the simulator: builtin:tiny on this machine's measured step times, 64-token requests
at half a replica's capacity, batches of 4 (within 2..8), 5 s intervals, 1-3 replicas, as `fleetlm-dev demo`
deploys it.

A request takes about 50 ms, so 1.8 or so are in flight on average and the running gauge at a scrape instant
swings between 0 and a full batch. The demo scaled 1 -> 3 five seconds in on such a scrape ("demand 4 slots
(running (>= arrivals 60.08/s x service 0.03s))"); the simulator did the same (1 -> 3 at t=5 s, then 16 replica
changes in 30 minutes of steady load) until the gauge counted towards a scale-up only beyond its swing.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fleetlm_dev import policy_inputs
from fleetlm_dev.sim import calibration, run, workload

CALM = workload.Trace(
    name="calm",
    description="the demo's calm: half a replica's capacity of 64-token requests, steady",
    duration_s=1200.0,
    load=lambda t: np.full_like(t, 0.5),
    classes=(workload.ClassLoad(name="default", share=1.0, prompt_tokens_mean=64, output_tokens_mean=64),),
    min_replicas=1,
    max_replicas=3,
    steady_from_s=120.0,
    steady_to_s=1200.0,
)


def test_a_full_batch_at_one_scrape_buys_no_pods() -> None:
    spec = dataclasses.replace(
        run.default_spec(CALM),
        batching=policy_inputs.DEMO_BATCHING,
        interval_s=5.0,
        scale_down_stabilization_s=30.0,
    )
    outcome = run.simulate(CALM, run.POLICIES["fleetlm"], calib=calibration.measured_two_core_tiny(), spec=spec, seed=1)
    ups = [t for t in outcome.ticks if any("scale up" in r for r in t.reasons)]
    # The swing of the gauge did happen: some scrapes read a batch well above the 1.8 or so in flight.
    swings = [t for t in outcome.ticks if any("the gauge as read" in r for r in t.reasons)]
    assert swings
    # It bought nothing: at most one scale-up, sized on the window's arrivals x service (the band still asks
    # for room around batches this small), then a steady fleet.
    assert len(ups) <= 1 and all("demand 3 slots (arrivals" in " ".join(t.reasons) for t in ups)
    assert max(t.replicas for t in outcome.ticks) <= 2
    assert outcome.steady_changes == 0
    assert outcome.attainment >= 0.99
