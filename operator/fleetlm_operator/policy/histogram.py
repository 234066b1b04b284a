"""Histogram maths on classic Prometheus histograms, as Prometheus does it.

Percentiles are interpolated inside the bucket holding the rank, as `histogram_quantile` does; the
fraction of observations under a limit is interpolated inside its bucket, as `histogram_fraction` does.
Deltas between two scrapes are what a window is built from: a histogram that went backwards (a restarted
pod, new bounds) gives no delta. Pure: no clock, no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping


@dataclasses.dataclass(frozen=True, slots=True)
class Histogram:
    """A classic Prometheus histogram: cumulative counts at finite upper bounds, plus +Inf (`count`)."""

    bounds: tuple[float, ...]  # finite `le` bounds, ascending
    cumulative: tuple[float, ...]  # observations <= each bound
    count: float  # all observations (the +Inf bucket)
    sum: float

    def __post_init__(self) -> None:
        if len(self.bounds) != len(self.cumulative):
            raise ValueError("bounds and cumulative counts must have the same length")
        if any(b >= a for a, b in zip(self.bounds[1:], self.bounds, strict=False)):
            raise ValueError("histogram bounds must be strictly ascending")

    @classmethod
    def empty(cls, bounds: Iterable[float]) -> Histogram:
        bounds_t = tuple(bounds)
        return cls(bounds=bounds_t, cumulative=(0.0,) * len(bounds_t), count=0.0, sum=0.0)

    def minus(self, earlier: Histogram) -> Histogram | None:
        """The observations made since `earlier`; None when the two cannot be subtracted (reset, new bounds)."""
        if earlier.bounds != self.bounds:
            return None
        cumulative = tuple(a - b for a, b in zip(self.cumulative, earlier.cumulative, strict=True))
        count = self.count - earlier.count
        if count < 0 or any(c < 0 for c in cumulative):
            return None
        return Histogram(bounds=self.bounds, cumulative=cumulative, count=count, sum=self.sum - earlier.sum)

    def plus(self, other: Histogram) -> Histogram:
        if other.bounds != self.bounds:
            raise ValueError("cannot add histograms with different bounds")
        cumulative = tuple(a + b for a, b in zip(self.cumulative, other.cumulative, strict=True))
        return Histogram(
            bounds=self.bounds, cumulative=cumulative, count=self.count + other.count, sum=self.sum + other.sum
        )

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None


def histogram_quantile(q: float, hist: Histogram) -> float | None:
    """Prometheus' `histogram_quantile` on one classic histogram; None where Prometheus gives NaN.

    Linear interpolation inside the bucket holding rank q*count; the lowest bucket starts at 0; a rank
    in the +Inf bucket answers the highest finite bound. Cumulative counts are made monotonic first.
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must lie strictly between 0 and 1, got {q}")
    if hist.count <= 0 or not hist.bounds:
        return None
    cumulative = _monotonic(hist.cumulative, hist.count)
    rank = q * hist.count
    index = next((i for i, c in enumerate(cumulative) if c >= rank), len(cumulative))
    if index == len(hist.bounds):
        return hist.bounds[-1]
    if index == 0 and hist.bounds[0] <= 0:
        return hist.bounds[0]
    start = 0.0 if index == 0 else hist.bounds[index - 1]
    end = hist.bounds[index]
    before = 0.0 if index == 0 else cumulative[index - 1]
    in_bucket = cumulative[index] - before
    return start + (end - start) * ((rank - before) / in_bucket)


def histogram_fraction_at_most(limit: float, hist: Histogram) -> float | None:
    """Fraction of observations <= `limit` (Prometheus' `histogram_fraction(0, limit)`), or None if empty.

    Inside a bucket the observations are taken as spread evenly; observations in the +Inf bucket count
    as above any limit past the highest finite bound (the conservative reading for an SLO).
    """
    if hist.count <= 0:
        return None
    if limit <= 0:
        return 0.0
    if not hist.bounds:
        return 0.0
    cumulative = _monotonic(hist.cumulative, hist.count)
    if limit >= hist.bounds[-1]:
        return cumulative[-1] / hist.count
    index = next(i for i, b in enumerate(hist.bounds) if b >= limit)
    lower = 0.0 if index == 0 else hist.bounds[index - 1]
    below = 0.0 if index == 0 else cumulative[index - 1]
    upper = hist.bounds[index]
    inside = (limit - lower) / (upper - lower) if upper > lower else 1.0
    return (below + inside * (cumulative[index] - below)) / hist.count


def _monotonic(cumulative: tuple[float, ...], count: float) -> list[float]:
    # Float sums across pods can leave a bucket a hair below the one before; Prometheus evens that out too.
    out: list[float] = []
    highest = 0.0
    for value in cumulative:
        highest = max(highest, value)
        out.append(min(highest, count))
    return out


def merge(hists: Iterable[Histogram]) -> Histogram | None:
    """The sum of `hists`; one whose bounds differ from the first is left out. None when there are none."""
    total: Histogram | None = None
    for hist in hists:
        if total is None:
            total = hist
        elif hist.bounds == total.bounds:
            total = total.plus(hist)
    return total


def add_per_class(into: dict[str, Histogram], delta: Mapping[str, Histogram]) -> bool:
    """Add per-class deltas; False when bounds disagree with what is already there."""
    for name, hist in delta.items():
        held = into.get(name)
        if held is None:
            into[name] = hist
        elif held.bounds != hist.bounds:
            return False
        else:
            into[name] = held.plus(hist)
    return True


def per_class_deltas(
    now: Mapping[str, Histogram], before: Mapping[str, Histogram] | None
) -> dict[str, Histogram] | None:
    """Per-class growth; a class absent before started at zero. None when any series went backwards."""
    out: dict[str, Histogram] = {}
    for name, hist in now.items():
        earlier = None if before is None else before.get(name)
        if earlier is None:
            out[name] = hist
            continue
        delta = hist.minus(earlier)
        if delta is None:
            return None
        out[name] = delta
    return out
