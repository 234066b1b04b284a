"""The queue bound sized in time: each class's per-replica queue limit about one TTFT target of the replica's work.

A queue longer than what a full replica serves within the class's TTFT target holds only requests that will
miss it, and it keeps missing after the pressure is gone: behind a plain Service, which spreads arrivals at
random, the old pods after a step still hold their queues when the new pods are ready, and every request sent
to them waits behind that backlog for another interval (a queue of 32 at 9 completions/s is 3.5 s of TTFT).
Bounded at what the replica serves in one TTFT target, a surge beyond what runs is refused (429, a miss that is
counted, and the client retries, most likely on another pod) instead of queued, and the old pods are clear by
the time the new ones are ready.

What a full replica serves per second comes from what the operator scrapes: the window's mean service time
(first schedule -> last token) at the batch it ran at, carried to a full batch of `max_batch_size` along the
cost line (service time ~ 1 + b/h, `Tuning.batch_half_cost_seqs`, the fitted h once `costcurve` trusts it).
The bound moves only when the new figure leaves a band around the one in force (`Tuning.queue_bound_band`),
so noise in the service time does not push a new runtime config every tick. It never exceeds the class's own
queue limit from the spec (the runtime's `queueLimit`, a cap the user set) and is at least
`Tuning.queue_bound_min`. Pure: no clock, no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from fleetlm_operator.policy import spec as spec_mod
from fleetlm_operator.policy import window as window_mod


@dataclasses.dataclass(frozen=True, slots=True)
class QueueBound:
    limits: Mapping[str, int]  # per class with a TTFT target; classes absent keep the spec's queue limit
    reasons: tuple[str, ...]


def full_batch_rate(window: window_mod.ObservedWindow, *, max_batch_size: int, tuning: spec_mod.Tuning) -> float | None:
    """Requests per second one replica completes with full batches of `max_batch_size`; None when the window
    has no service time or no running batch to carry it from."""
    service_s = window.mean_service_s
    batch = window.mean_running_per_pod
    if service_s is None or service_s <= 0 or batch is None or batch <= 0:
        return None
    finished = (window.finished_per_s or 0.0) * window.window_s
    if finished < tuning.min_requests_for_latency:
        return None  # a mean service time of a handful of requests says little about the next thousand
    half = tuning.batch_half_cost_seqs
    full_service_s = service_s * (1.0 + max_batch_size / half) / (1.0 + batch / half)
    return max_batch_size / full_service_s


def bounded(qos_class: spec_mod.ClassSpec, *, num_classes: int) -> bool:
    """Whether the tuner bounds this class's queue. Where a service has classes, only the sheddable ones: the
    others queue, as the Gateway API Inference Extension's Critical and Standard requests do under saturation
    (only Sheddable ones are dropped), and a user who marked a class not sheddable expects its requests served,
    late if need be, not refused (the demo's standard class, e2e b). A service with one class has nobody else
    to protect: refusing what would wait past the target keeps it for those already waiting."""
    return num_classes == 1 or qos_class.sheddable


def decide_queue_bound(
    spec: spec_mod.PolicySpec,
    window: window_mod.ObservedWindow,
    *,
    max_batch_size: int,
    held: Mapping[str, int],
) -> QueueBound:
    """Each class's queue limit per replica: its TTFT target times what a full replica completes per second,
    held while the new figure stays within the band around the one in force."""
    tuning = spec.tuning
    rate = full_batch_rate(window, max_batch_size=max_batch_size, tuning=tuning)
    if rate is None:
        return QueueBound(limits=dict(held), reasons=())
    limits: dict[str, int] = {}
    moved: list[str] = []
    classes = spec.classes or (spec_mod.ClassSpec(name=spec_mod.DEFAULT_CLASS_NAME),)
    for qos_class in classes:
        ttft_s, _ = spec.targets_for(qos_class.name)
        if ttft_s is None or not bounded(qos_class, num_classes=len(classes)):
            continue
        wanted = max(tuning.queue_bound_min, round(ttft_s * rate))
        if qos_class.queue_limit is not None:
            wanted = min(wanted, qos_class.queue_limit)
        before = held.get(qos_class.name)
        if before is not None and before / tuning.queue_bound_band <= wanted <= before * tuning.queue_bound_band:
            limits[qos_class.name] = before
            continue
        limits[qos_class.name] = wanted
        moved.append(f"{qos_class.name} {before if before is not None else '-'} -> {wanted}")
    reasons = (
        (
            f"queue bound: {', '.join(moved)} waiting per replica (TTFT target x {rate:.1f} req/s a full "
            f"batch of {max_batch_size} completes)",
        )
        if moved
        else ()
    )
    return QueueBound(limits=limits, reasons=reasons)
