"""How long a service's pods take to start, learnt from its own pods, and which loading pods still count.

A new pod is capacity on its way: the replica rule counts it so that it does not scale up again for
demand that pod will serve (the cascade 2 -> 4 -> 8 while pods load). That credit is bounded: a pod that
has been loading for more than `startup_stuck_factor` times the learnt start-up time is not coming soon
(crash-looping, unschedulable, pulling forever) and stops counting, so the fleet can replace it.

The start-up time is learnt per service from pods that became ready: creation -> Ready as the API server
reports it (scheduling, image pull, weight load and warm-up all included), smoothed exponentially, each
pod counted once. Until a pod has been seen starting, `Tuning.startup_prior_s` stands in. Pure: the
handler (or the simulator) hands in the observations and the loading pods' ages; no clock, no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from fleetlm_operator.policy import spec as spec_mod

MAX_REMEMBERED_PODS = 64  # pods already counted, so a pod is learnt once (bounds the annotation)


@dataclasses.dataclass(frozen=True, slots=True)
class StartupStats:
    """The learnt start-up time of one service (persisted in `TunerState`)."""

    mean_s: float | None = None  # exponentially smoothed creation -> ready, seconds; None: nothing seen yet
    count: int = 0  # pods learnt from
    last_s: float | None = None  # the latest pod's start-up
    pods: tuple[str, ...] = ()  # the most recent pods already counted (oldest first)

    def to_dict(self) -> dict[str, object]:
        return {"meanS": self.mean_s, "count": self.count, "lastS": self.last_s, "pods": list(self.pods)}

    @classmethod
    def from_dict(cls, data: object) -> StartupStats:
        if not isinstance(data, dict):
            raise ValueError(f"startup must be an object, got {data!r}")
        mean, last = data.get("meanS"), data.get("lastS")
        return cls(
            mean_s=None if mean is None else float(mean),
            count=int(data.get("count", 0)),
            last_s=None if last is None else float(last),
            pods=tuple(str(p) for p in data.get("pods", []))[-MAX_REMEMBERED_PODS:],
        )


def observe(stats: StartupStats, started: Iterable[spec_mod.PodStartup], *, tuning: spec_mod.Tuning) -> StartupStats:
    """`stats` with the pods not counted before added, in the order given (oldest ready first)."""
    mean, count, last = stats.mean_s, stats.count, stats.last_s
    pods = list(stats.pods)
    known = set(pods)
    for pod in started:
        if pod.pod in known or not pod.seconds >= 0:
            continue
        known.add(pod.pod)
        pods.append(pod.pod)
        mean = pod.seconds if mean is None else mean + tuning.startup_smoothing * (pod.seconds - mean)
        count += 1
        last = pod.seconds
    return StartupStats(mean_s=mean, count=count, last_s=last, pods=tuple(pods[-MAX_REMEMBERED_PODS:]))


def expected_s(stats: StartupStats, *, tuning: spec_mod.Tuning) -> float:
    """The start-up time to plan with: the learnt one, else the prior."""
    return stats.mean_s if stats.mean_s is not None else tuning.startup_prior_s


@dataclasses.dataclass(frozen=True, slots=True)
class Loading:
    """The pods asked for that are not ready, split by whether they still count as capacity."""

    on_the_way: int  # loading for at most `startup_stuck_factor` x the expected start-up
    stuck: int  # loading for longer: not counted
    oldest_s: float | None  # age of the oldest one on its way
    limit_s: float  # the age past which a loading pod stops counting
    startup_s: float | None = None  # the learnt start-up time (None: no pod seen starting yet)


def classify(policy_input: spec_mod.PolicyInput, stats: StartupStats, *, tuning: spec_mod.Tuning) -> Loading:
    """Split the not-ready pods. Without their ages (a caller that cannot list pods) all of them count."""
    limit_s = tuning.startup_stuck_factor * expected_s(stats, tuning=tuning)
    ages = policy_input.loading_ages_s
    if ages is None:
        return Loading(
            on_the_way=policy_input.starting_replicas, stuck=0, oldest_s=None, limit_s=limit_s, startup_s=stats.mean_s
        )
    fresh = [age for age in ages if age <= limit_s]
    return Loading(
        on_the_way=len(fresh),
        stuck=len(ages) - len(fresh),
        oldest_s=max(fresh) if fresh else None,
        limit_s=limit_s,
        startup_s=stats.mean_s,
    )
