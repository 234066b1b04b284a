"""Traces the simulator replays: offered load over time, request shapes and QoS classes.

Load is written in *replicas' worth*: 1.0 is the arrival rate one replica can carry while meeting the
SLO (the oracle's per-replica capacity for this request mix and calibration), so a trace means the same
thing under any calibration and the oracle's replica count is simply ceil(load). Arrivals are a
non-homogeneous Poisson process (time-rescaled unit-rate arrivals); prompt and output lengths are
lognormal. This module decides nothing and does no I/O.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

LoadFn = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True, slots=True)
class ClassLoad:
    """One QoS class in a trace: its share of arrivals and the shape of its requests."""

    name: str
    share: float
    prompt_tokens_mean: float
    output_tokens_mean: float
    priority: int = 0
    sheddable: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Trace:
    name: str
    description: str
    duration_s: float
    load: LoadFn  # replicas' worth at each time (seconds)
    classes: tuple[ClassLoad, ...]
    min_replicas: int = 1
    max_replicas: int = 16
    step_at_s: float | None = None  # where the step bar measures recovery from
    steady_from_s: float | None = None  # the zero-changes bar counts changes in [steady_from_s, steady_to_s)
    steady_to_s: float | None = None
    startup_s: float | None = None  # pod start-up for this trace; None: the calibration's

    def startup_for(self, default_s: float) -> float:
        return default_s if self.startup_s is None else self.startup_s

    def class_names(self) -> tuple[str, ...]:
        """Classes in priority order (most urgent first): the order the replicas' queues serve."""
        return tuple(c.name for c in sorted(self.classes, key=lambda c: (c.priority, c.name)))


@dataclasses.dataclass(frozen=True, slots=True)
class Arrivals:
    times_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    class_index: np.ndarray  # index into Trace.class_names()


def _lognormal(rng: np.random.Generator, mean: float, size: int, *, cv: float = 0.6, low: int = 4) -> np.ndarray:
    sigma = math.sqrt(math.log(1.0 + cv * cv))
    mu = math.log(mean) - sigma * sigma / 2.0
    values = rng.lognormal(mu, sigma, size)
    return np.clip(np.rint(values), low, int(4 * mean)).astype(np.int64)


def generate(trace: Trace, *, rate_per_replica: float, seed: int, grid_s: float = 0.5) -> Arrivals:
    """Arrivals for `trace` when one replica's worth is `rate_per_replica` requests per second."""
    rng = np.random.default_rng(seed)
    grid = np.arange(0.0, trace.duration_s + grid_s, grid_s)
    rates = np.maximum(trace.load(grid), 0.0) * rate_per_replica
    cumulative = np.concatenate([[0.0], np.cumsum((rates[1:] + rates[:-1]) * 0.5 * grid_s)])
    total = float(cumulative[-1])
    unit = np.cumsum(rng.exponential(1.0, int(total * 1.2) + 100))
    unit = unit[unit < total]
    times = np.interp(unit, cumulative, grid)
    return _shape(trace, times, rng)


def unit_arrivals(trace: Trace, *, count: int, seed: int) -> Arrivals:
    """`count` arrivals of a unit-rate Poisson process with the trace's request mix (scale times by 1/rate)."""
    rng = np.random.default_rng(seed)
    return _shape(trace, np.cumsum(rng.exponential(1.0, count)), rng)


def _shape(trace: Trace, times: np.ndarray, rng: np.random.Generator) -> Arrivals:
    names = trace.class_names()
    by_name = {c.name: c for c in trace.classes}
    shares = np.array([by_name[n].share for n in names], dtype=float)
    index = rng.choice(len(names), size=len(times), p=shares / shares.sum())
    prompts = np.empty(len(times), dtype=np.int64)
    outputs = np.empty(len(times), dtype=np.int64)
    for i, name in enumerate(names):
        mask = index == i
        count = int(mask.sum())
        prompts[mask] = _lognormal(rng, by_name[name].prompt_tokens_mean, count, low=8)
        outputs[mask] = _lognormal(rng, by_name[name].output_tokens_mean, count, low=4)
    return Arrivals(times_s=times, prompt_tokens=prompts, output_tokens=outputs, class_index=index)


# ------------------------------------------------------------------------------------------------
# The named traces

_CHAT = (ClassLoad(name="default", share=1.0, prompt_tokens_mean=256, output_tokens_mean=160),)


def _step(t: np.ndarray) -> np.ndarray:
    return np.where(t < 600.0, 2.5, 10.0)


def _diurnal(t: np.ndarray) -> np.ndarray:
    period_s = 7200.0
    low, high = 1.5, 9.0
    return low + (high - low) * 0.5 * (1.0 - np.cos(2.0 * np.pi * t / period_s))


def _bursts(t: np.ndarray) -> np.ndarray:
    base = 3.0
    in_burst = (t % 300.0) >= 255.0  # the last 45 s of every 5 minutes
    return np.where(in_burst, base * 2.5, base)


def _class_mix(t: np.ndarray) -> np.ndarray:
    # 3 -> 9 replicas' worth and back over 40 minutes, with max_replicas 6: the middle cannot be served
    # whole, and the sheddable class must give way.
    return 3.0 + 6.0 * np.clip(1.0 - np.abs(t - 1200.0) / 900.0, 0.0, 1.0)


TRACES: dict[str, Trace] = {
    "step": Trace(
        name="step",
        description="1x -> 4x step at 10 min (2.5 -> 10 replicas' worth), held 45 min",
        duration_s=600.0 + 2700.0,
        load=_step,
        classes=_CHAT,
        step_at_s=600.0,
        steady_from_s=600.0 + 900.0,
        steady_to_s=600.0 + 2700.0,
    ),
    "startup60": Trace(
        name="startup60",
        description="the step (1x -> 4x at 10 min) with 60 s pod start-ups: cold GPU pods loading weights",
        duration_s=600.0 + 2700.0,
        load=_step,
        classes=_CHAT,
        step_at_s=600.0,
        steady_from_s=600.0 + 900.0,
        steady_to_s=600.0 + 2700.0,
        startup_s=60.0,
    ),
    "diurnal": Trace(
        name="diurnal",
        description="one day compressed into 2 h: 1.5 -> 9 -> 1.5 replicas' worth (cosine)",
        duration_s=7200.0,
        load=_diurnal,
        classes=_CHAT,
    ),
    "bursts": Trace(
        name="bursts",
        description="3 replicas' worth with 45 s bursts to 2.5x every 5 min, 40 min",
        duration_s=2400.0,
        load=_bursts,
        classes=_CHAT,
    ),
    "class-mix": Trace(
        name="class-mix",
        description="interactive (60%) + sheddable batch (40%, long outputs); 3 -> 9 -> 3 replicas' worth, max 6",
        duration_s=2400.0,
        load=_class_mix,
        classes=(
            ClassLoad(name="interactive", share=0.6, prompt_tokens_mean=256, output_tokens_mean=128, priority=0),
            ClassLoad(
                name="batch", share=0.4, prompt_tokens_mean=512, output_tokens_mean=256, priority=10, sheddable=True
            ),
        ),
        max_replicas=6,
    ),
}
