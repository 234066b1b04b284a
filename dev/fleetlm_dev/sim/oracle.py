"""The oracle: the fewest replicas that meet the SLO at each moment, from the calibration alone.

Requests reach pods through a Kubernetes Service, which picks a pod at random; a Poisson stream split at
random stays Poisson, so each of N replicas sees rate/N. The oracle therefore needs one number: the
highest Poisson rate one replica can take while every class meets its targets on the attainment target
(found by bisection on a single simulated replica, at the best max_batch_size within the spec's bounds,
with no start-up delay and no reaction time). A trace's load is written in those units, so the oracle's
replica count at time t is max(min, ceil(load(t))), capped at max. Decides nothing; no I/O.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from fleetlm_dev.sim import calibration, replica, workload
from fleetlm_operator.policy import spec as spec_mod


@dataclasses.dataclass(frozen=True, slots=True)
class Capacity:
    rate_per_s: float  # Poisson arrivals per second one replica carries within the SLO
    max_batch_size: int  # the batch limit that achieves it


def _attains(
    arrivals: workload.Arrivals,
    *,
    rate_per_s: float,
    calib: calibration.Calibration,
    class_names: tuple[str, ...],
    slo: spec_mod.SLOTargets,
    targets: tuple[tuple[float | None, float | None], ...],
    max_batch_size: int,
    max_batch_tokens: int,
    duration_s: float,
    warmup_s: float,
) -> bool:
    done: list[replica.Seq] = []
    pod = replica.Replica(
        "oracle",
        calib=calib,
        class_names=class_names,
        max_batch_size=max_batch_size,
        max_batch_tokens=max_batch_tokens,
        created_s=0.0,
        ready_s=0.0,
        sink=done.append,
    )
    times = arrivals.times_s / rate_per_s
    count = int(np.searchsorted(times, duration_s))
    for i in range(count):
        t = float(times[i])
        pod.advance_to(t)
        pod.submit(
            replica.Seq(
                t, int(arrivals.prompt_tokens[i]), int(arrivals.output_tokens[i]), int(arrivals.class_index[i])
            ),
            t,
        )
        if pod.in_flight > 20 * max_batch_size:
            return False  # hopelessly overloaded; no need to simulate the rest
    pod.advance_to(math.inf)
    met = [0] * len(class_names)
    total = [0] * len(class_names)
    for seq in done:
        if seq.arrival_s < warmup_s:
            continue
        ttft_s, tpot_s = targets[seq.cls]
        ok = ttft_s is None or seq.first_s - seq.arrival_s <= ttft_s
        if ok and tpot_s is not None and seq.output > 1:
            ok = (seq.finish_s - seq.first_s) / (seq.output - 1) <= tpot_s
        total[seq.cls] += 1
        met[seq.cls] += ok
    goal = slo.target_attainment
    return all(n == 0 or m / n >= goal for m, n in zip(met, total, strict=True))


@functools.lru_cache(maxsize=16)
def replica_capacity(
    classes: tuple[workload.ClassLoad, ...],
    calib: calibration.Calibration,
    spec: spec_mod.PolicySpec,
    *,
    seed: int = 7,
    duration_s: float = 900.0,
) -> Capacity:
    """Highest per-replica Poisson rate meeting the SLO, over a grid of max_batch_size within bounds."""
    probe = workload.Trace(name="oracle", description="", duration_s=duration_s, load=lambda t: t, classes=classes)
    names = probe.class_names()
    targets = tuple(spec.targets_for(name) for name in names)
    mean_output = sum(c.share * c.output_tokens_mean for c in classes) / sum(c.share for c in classes)
    batching = spec.batching
    grid = sorted(
        {
            b
            for b in (8, 12, 16, 24, 32, 40, 48, 56, 64, 72, 80, 96, 112, 128, 160, 192, 256, 384, 512)
            if batching.min_max_batch_size <= b <= batching.max_max_batch_size
        }
        | {batching.min_max_batch_size, batching.max_max_batch_size}
    )
    best = Capacity(rate_per_s=0.0, max_batch_size=batching.max_batch_size)
    for max_batch_size in grid:
        tokens = max(batching.max_batch_tokens, max_batch_size)
        ceiling = 1.3 * max_batch_size / (mean_output * calib.step.decode_step_s(max_batch_size))
        if ceiling <= best.rate_per_s:
            continue
        arrivals = workload.unit_arrivals(probe, count=int(ceiling * duration_s * 1.1) + 50, seed=seed)

        def attains(rate: float, *, b: int = max_batch_size, k: int = tokens, a: workload.Arrivals = arrivals) -> bool:
            return _attains(
                a,
                rate_per_s=rate,
                calib=calib,
                class_names=names,
                slo=spec.slo,
                targets=targets,
                max_batch_size=b,
                max_batch_tokens=k,
                duration_s=duration_s,
                warmup_s=duration_s * 0.1,
            )

        low = best.rate_per_s
        if not attains(low * 1.01 if low > 0 else ceiling * 0.05):
            continue
        high = ceiling
        for _ in range(9):
            mid = 0.5 * (low + high)
            if attains(mid):
                low = mid
            else:
                high = mid
        if low > best.rate_per_s:
            best = Capacity(rate_per_s=low, max_batch_size=max_batch_size)
    if best.rate_per_s <= 0:
        raise ValueError("no batch size within the bounds meets the SLO even at a trickle of load")
    return best


def replicas_needed(load: np.ndarray, *, min_replicas: int, max_replicas: int) -> np.ndarray:
    """The oracle's replica count for a load in replicas' worth."""
    return np.clip(np.ceil(load - 1e-9), max(min_replicas, 1), max_replicas).astype(np.int64)
