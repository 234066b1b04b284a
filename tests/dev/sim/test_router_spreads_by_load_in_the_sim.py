"""With `spec.router.enabled` the simulated service routes like FleetLM's router: each arrival to the ready pod
with the fewest requests in flight (the router's own `picker.least_loaded`), where a plain Service spreads
them at random. After a step that is what lets the pods that just turned ready fill first."""

from __future__ import annotations

from fleetlm_dev.sim import calibration, replica, run, workload


def _pod(name: str, done: list[replica.Seq]) -> replica.Replica:
    return replica.Replica(
        name,
        calib=calibration.GPU_LIKE,
        class_names=("default",),
        max_batch_size=4,
        max_batch_tokens=4096,
        created_s=0.0,
        ready_s=0.0,
        sink=done.append,
        queue_limit=32,
    )


def test_the_pick_goes_to_the_pod_with_the_fewest_in_flight() -> None:
    done: list[replica.Seq] = []
    busy, idle, half = _pod("busy", done), _pod("idle", done), _pod("half", done)
    for _ in range(6):  # a full batch of 4 and 2 queued
        assert busy.submit(replica.Seq(0.0, 64, 200, 0), 0.0)
    for _ in range(2):
        assert half.submit(replica.Seq(0.0, 64, 200, 0), 0.0)
    assert run._least_loaded([busy, half, idle], 0.01, tie_break=0) is idle
    assert run._least_loaded([busy, half], 0.01, tie_break=0) is half
    # Requests that finished no longer count: once the busy pod has drained, it is as good as any.
    assert run._least_loaded([busy], 1e6, tie_break=0) is busy
    assert busy.in_flight == 0


def test_the_routed_run_says_so_and_its_step_refills_on_the_new_pods(step_run: run.Outcome) -> None:
    service = step_run
    routed = run.simulate(
        workload.TRACES["step"], run.POLICIES["fleetlm"], options=run.FleetOptions(router=True), seed=1
    )
    assert (service.router, service.variant) == (False, "fleetlm")
    assert (routed.router, routed.variant) == (True, "fleetlm+router")
    # Same arrivals, same policy: the router's run serves the first interval of the new pods better (the old
    # pods' queues are not topped up while the new pods sit half empty). Both recover within the #18 bar of 2
    # intervals since the tuner bounds the queues in time (`policy.queuebound`: the Service's old pods no
    # longer hold a backlog of 32 each when the new ones turn ready), so the recovery no longer tells them apart.
    assert routed.num_requests == service.num_requests
    assert service.recovery_intervals is not None and routed.recovery_intervals is not None
    assert routed.recovery_intervals <= service.recovery_intervals
    first_served = int(workload.TRACES["step"].step_at_s // service.interval_s) + 2  # pods asked at the step's tick
    assert routed.interval_attainment[first_served] > service.interval_attainment[first_served]
