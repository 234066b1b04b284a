"""Builders of the tuning policy's inputs for tests: a spec, and an observed window with the figures a case names.

`build_window` builds an `ObservedWindow` the way `window.build` would for a fleet whose pods each run
`running_per_pod` sequences with `waiting_per_pod` queued; unless given, the arrival rate is what
Little's law says keeps that many running (so demand = running). The policy tests (tests/operator/policy)
and the HPA baseline's (tests/dev/sim) share them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fleetlm_operator.policy import spec as spec_mod
from fleetlm_operator.policy import window

# Three classes in priority order, the two less urgent sheddable: what the shedding tests shed and restore.
THREE_CLASSES = (
    spec_mod.ClassSpec(name="interactive", priority=0),
    spec_mod.ClassSpec(name="batch", priority=10, sheddable=True),
    spec_mod.ClassSpec(name="bulk", priority=20, sheddable=True),
)

# The batch bounds `fleetlm-dev demo` deploys: batches of 4 within 2..8 sequences, as its small CPU pods run.
DEMO_BATCHING = spec_mod.BatchingBounds(
    max_batch_size=4,
    max_batch_tokens=512,
    min_max_batch_size=2,
    max_max_batch_size=8,
    min_max_batch_tokens=128,
    max_max_batch_tokens=1024,
)

MakeSpec = Callable[..., spec_mod.PolicySpec]
MakeWindow = Callable[..., window.ObservedWindow]


def build_spec(**overrides: Any) -> spec_mod.PolicySpec:
    tuning = overrides.pop("tuning", spec_mod.Tuning())
    batching = overrides.pop(
        "batching",
        spec_mod.BatchingBounds(
            max_batch_size=64,
            max_batch_tokens=4096,
            min_max_batch_size=8,
            max_max_batch_size=256,
            min_max_batch_tokens=256,
            max_max_batch_tokens=16384,
        ),
    )
    values: dict[str, Any] = {
        "slo": spec_mod.SLOTargets(ttft_s=0.5, tpot_s=0.05, percentile=95.0),
        "min_replicas": 1,
        "max_replicas": 16,
        "batching": batching,
        "interval_s": 15.0,
        "scale_up_stabilization_s": 0.0,
        "scale_down_stabilization_s": 300.0,
        "tuning": tuning,
    }
    values.update(overrides)
    return spec_mod.PolicySpec(**values)


def build_window(
    *,
    pods: int = 4,
    expected: int | None = None,
    with_delta: int | None = None,
    running_per_pod: float = 30.0,
    waiting_per_pod: float = 0.0,
    arrival_per_s: float | None = None,
    service_s: float | None = 4.0,
    num_requests: int = 600,
    ttft_quantile_s: float | None = 0.1,
    tpot_quantile_s: float | None = 0.03,
    ttft_mean_s: float | None = 0.08,
    tpot_mean_s: float | None = 0.025,
    ttft_attainment: float | None = 1.0,
    tpot_attainment: float | None = 1.0,
    kv_usage: float | None = 0.3,
    complete: bool = True,
    reason: str = "",
    classes: dict[str, window.ClassWindow] | None = None,
    end_s: float = 1000.0,
) -> window.ObservedWindow:
    # Finishes are what Little's law says the running batches complete; arrivals, unless given, match.
    finished_per_s = running_per_pod * pods / service_s if service_s is not None else arrival_per_s
    if arrival_per_s is None:
        arrival_per_s = finished_per_s
    if classes is None:
        classes = {
            "default": window.ClassWindow(
                name="default",
                num_requests=num_requests,
                ttft_quantile_s=ttft_quantile_s,
                tpot_quantile_s=tpot_quantile_s,
                ttft_attainment=ttft_attainment,
                tpot_attainment=tpot_attainment,
                finished_per_s=finished_per_s,
                rejected_per_s=0.0,
                num_running=running_per_pod * pods,
                num_waiting=waiting_per_pod * pods,
            )
        }
    attainment = None
    known = [v for v in (ttft_attainment, tpot_attainment) if v is not None]
    if known:
        attainment = min(known)
    return window.ObservedWindow(
        start_s=end_s - 15.0,
        end_s=end_s,
        quantile=0.95,
        num_pods_expected=pods if expected is None else expected,
        num_pods_sampled=pods,
        num_pods_with_delta=pods if with_delta is None else with_delta,
        complete=complete,
        reason=reason,
        classes=classes,
        num_requests=num_requests,
        ttft_quantile_s=ttft_quantile_s,
        tpot_quantile_s=tpot_quantile_s,
        ttft_mean_s=ttft_mean_s,
        tpot_mean_s=tpot_mean_s,
        ttft_attainment=ttft_attainment,
        tpot_attainment=tpot_attainment,
        slo_attainment=attainment,
        finished_per_s=finished_per_s,
        arrival_per_s=arrival_per_s,
        rejected_per_s=0.0,
        mean_service_s=service_s,
        num_running=running_per_pod * pods,
        num_waiting=waiting_per_pod * pods,
        kv_usage=kv_usage,
        kv_usage_max=kv_usage,
        gpu_utilization=None,
    )
