"""Window building: two scrapes of the fleet (or Prometheus increases) -> one `ObservedWindow`.

Percentiles and SLO attainment come from histogram bucket *deltas* summed over pods (the maths is in
`histogram`); whether the window met the SLO is `slo.assess`'s to judge. Counter resets (a restarted
pod) count from zero, as Prometheus' `increase()` does. This module decides nothing about replicas or
batches, and it must never turn missing data into zero: a series that is absent, stale or without a
baseline stays `None` and the window says why (`complete=False`, `reason`). It reads no clock (`now_s`
is a parameter) and does no I/O.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping

from fleetlm_operator.policy import spec as spec_mod
from fleetlm_operator.policy.histogram import (
    Histogram,
    add_per_class,
    histogram_fraction_at_most,
    histogram_quantile,
    merge,
    per_class_deltas,
)

# PodSample fields whose absence makes a pod's data partial. GPU utilization is legitimately absent on
# CPU pods and service time is optional: neither makes a window incomplete.
REQUIRED_FIELDS = frozenset({"running", "waiting", "kv_usage", "ttft", "tpot", "finished"})


@dataclasses.dataclass(frozen=True, slots=True)
class PodSample:
    """One scrape of one pod, already read into the policy's terms (see `collect.parse`).

    Gauges are values at `scraped_at_s`; histograms and counters are cumulative since the process (or
    the series) started. A field the scrape did not carry is absent/None and named in `missing`.
    """

    pod: str
    scraped_at_s: float
    running_by_class: Mapping[str, float] = dataclasses.field(default_factory=dict)
    waiting_by_class: Mapping[str, float] = dataclasses.field(default_factory=dict)
    kv_usage: float | None = None  # 0..1
    gpu_utilization: float | None = None  # 0..1, mean over the pod's GPUs; None without a GPU
    ttft_by_class: Mapping[str, Histogram] = dataclasses.field(default_factory=dict)
    tpot_by_class: Mapping[str, Histogram] = dataclasses.field(default_factory=dict)
    service_by_class: Mapping[str, Histogram] = dataclasses.field(default_factory=dict)  # first schedule -> last token
    finished_by_class: Mapping[str, float] = dataclasses.field(default_factory=dict)  # counter
    rejected_by_class: Mapping[str, float] = dataclasses.field(default_factory=dict)  # counter (overload only)
    started_at_s: float | None = None  # when the process began (its start-time gauge, else the earliest `_created`)
    # When the pod turned ready (the runtime's ready-time gauge): nothing is served, so no counter grows,
    # before it; a pod first scraped after turning ready inside the window counts from this moment.
    ready_at_s: float | None = None
    applied: Mapping[str, str] = dataclasses.field(default_factory=dict)  # config_info labels (limits in force)
    missing: frozenset[str] = frozenset()  # REQUIRED_FIELDS (and others) this scrape lacked


@dataclasses.dataclass(frozen=True, slots=True)
class Increases:
    """What grew over the window across the pods that have a baseline (or Prometheus' increase/rate)."""

    window_s: float
    num_pods: int  # pods whose growth is counted here
    ttft_by_class: Mapping[str, Histogram] = dataclasses.field(default_factory=dict)
    tpot_by_class: Mapping[str, Histogram] = dataclasses.field(default_factory=dict)
    service_by_class: Mapping[str, Histogram] = dataclasses.field(default_factory=dict)
    finished_per_s_by_class: Mapping[str, float] = dataclasses.field(default_factory=dict)
    rejected_per_s_by_class: Mapping[str, float] = dataclasses.field(default_factory=dict)
    in_system_growth_per_s: float | None = None  # d(running + waiting)/dt over the same pods


@dataclasses.dataclass(frozen=True, slots=True)
class Gauges:
    """Instant values at the end of the window, over the pods sampled."""

    running_by_class: Mapping[str, float] = dataclasses.field(default_factory=dict)
    waiting_by_class: Mapping[str, float] = dataclasses.field(default_factory=dict)
    kv_usage: float | None = None  # mean over pods that report it
    kv_usage_max: float | None = None
    gpu_utilization: float | None = None  # mean over pods that report it


@dataclasses.dataclass(frozen=True, slots=True)
class Coverage:
    """How much of the fleet the window saw, and what was wrong with the rest."""

    num_pods_expected: int
    num_pods_sampled: int
    problems: tuple[str, ...] = ()
    num_counter_resets: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class ClassWindow:
    """One QoS class over the window."""

    name: str
    num_requests: int  # TTFT observations (first tokens) in the window
    ttft_quantile_s: float | None
    tpot_quantile_s: float | None
    ttft_attainment: float | None  # fraction of first tokens within the class's TTFT target
    tpot_attainment: float | None
    finished_per_s: float | None
    rejected_per_s: float | None
    num_running: float | None
    num_waiting: float | None

    @property
    def attainment(self) -> float | None:
        """The lower of TTFT and TPOT attainment: a request must meet both, and buckets cannot say more."""
        values = [v for v in (self.ttft_attainment, self.tpot_attainment) if v is not None]
        return min(values) if values else None


@dataclasses.dataclass(frozen=True, slots=True)
class ObservedWindow:
    """The fleet over one window, as the policy reads it. None means unknown, never zero."""

    start_s: float
    end_s: float
    quantile: float  # the SLO percentile / 100
    num_pods_expected: int
    num_pods_sampled: int
    num_pods_with_delta: int
    complete: bool
    reason: str  # "" when complete; else what was missing, stale or partial
    classes: Mapping[str, ClassWindow]
    num_requests: int
    ttft_quantile_s: float | None
    tpot_quantile_s: float | None
    ttft_mean_s: float | None  # exact (histogram sum / count), unlike quantiles read off coarse buckets
    tpot_mean_s: float | None
    ttft_attainment: float | None  # fraction within each class's target, over all classes
    tpot_attainment: float | None
    slo_attainment: float | None
    finished_per_s: float | None
    arrival_per_s: float | None  # finished + rejected + growth of what is in the system
    rejected_per_s: float | None
    mean_service_s: float | None  # mean time from first scheduling to last token
    num_running: float | None
    num_waiting: float | None
    kv_usage: float | None
    kv_usage_max: float | None
    gpu_utilization: float | None
    num_counter_resets: int = 0

    @property
    def window_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def waiting_per_pod(self) -> float | None:
        return (
            None if self.num_waiting is None or self.num_pods_sampled == 0 else self.num_waiting / self.num_pods_sampled
        )

    @property
    def running_per_pod(self) -> float | None:
        return (
            None if self.num_running is None or self.num_pods_sampled == 0 else self.num_running / self.num_pods_sampled
        )

    @property
    def mean_running_per_pod(self) -> float | None:
        """The running batch per pod averaged over the window, by Little's law on the running stage.

        Finishes per second x mean service time, over the pods that counted both: the batch the window's
        service times and TPOT were measured at. Steadier than `running_per_pod`, one instant of a gauge
        that swings by a quarter between scrapes on a busy engine. None when either figure is unknown.
        """
        if self.finished_per_s is None or self.mean_service_s is None or self.num_pods_with_delta <= 0:
            return None
        return self.finished_per_s * self.mean_service_s / self.num_pods_with_delta


def unavailable(reason: str, *, now_s: float, quantile: float, num_pods_expected: int = 0) -> ObservedWindow:
    """A window with nothing in it: every figure unknown."""
    return ObservedWindow(
        start_s=now_s,
        end_s=now_s,
        quantile=quantile,
        num_pods_expected=num_pods_expected,
        num_pods_sampled=0,
        num_pods_with_delta=0,
        complete=False,
        reason=reason,
        classes={},
        num_requests=0,
        ttft_quantile_s=None,
        tpot_quantile_s=None,
        ttft_mean_s=None,
        tpot_mean_s=None,
        ttft_attainment=None,
        tpot_attainment=None,
        slo_attainment=None,
        finished_per_s=None,
        arrival_per_s=None,
        rejected_per_s=None,
        mean_service_s=None,
        num_running=None,
        num_waiting=None,
        kv_usage=None,
        kv_usage_max=None,
        gpu_utilization=None,
    )


def build(
    increases: Increases | None,
    gauges: Gauges | None,
    *,
    coverage: Coverage,
    spec: spec_mod.PolicySpec,
    start_s: float,
    end_s: float,
) -> ObservedWindow:
    """Assemble a window from what grew (None: no pod had a baseline) and the gauges at its end."""
    quantile = spec.slo.quantile
    problems = list(coverage.problems)
    if coverage.num_pods_expected == 0:
        problems.insert(0, "no ready pods to scrape")
    if coverage.num_pods_sampled == 0 or gauges is None:
        return unavailable(
            "; ".join(problems) or "no pods scraped",
            now_s=end_s,
            quantile=quantile,
            num_pods_expected=coverage.num_pods_expected,
        )
    if increases is None:
        problems.append("no pod has a baseline scrape: rates and latencies unknown")
    elif increases.num_pods < coverage.num_pods_sampled:
        problems.append(f"growth counted on {increases.num_pods}/{coverage.num_pods_sampled} sampled pods")

    names = set(gauges.running_by_class) | set(gauges.waiting_by_class)
    if increases is not None:
        names |= set(increases.ttft_by_class) | set(increases.tpot_by_class)
        names |= set(increases.finished_per_s_by_class) | set(increases.rejected_per_s_by_class)
    classes: dict[str, ClassWindow] = {}
    for name in sorted(names):
        classes[name] = _class_window(name, increases, gauges, spec=spec, quantile=quantile)

    ttft_all = merge(increases.ttft_by_class.values()) if increases is not None else None
    tpot_all = merge(increases.tpot_by_class.values()) if increases is not None else None
    service_all = merge(increases.service_by_class.values()) if increases is not None else None

    def weighted_mean(pairs: list[tuple[float, float | None]]) -> float | None:
        known = [(w, v) for w, v in pairs if v is not None and w > 0]
        total = sum(w for w, _ in known)
        return sum(w * v for w, v in known) / total if total > 0 else None

    ttft_attainment = weighted_mean([(c.num_requests, c.ttft_attainment) for c in classes.values()])
    tpot_attainment = weighted_mean(
        [
            (
                increases.tpot_by_class[n].count if increases is not None and n in increases.tpot_by_class else 0.0,
                c.tpot_attainment,
            )
            for n, c in classes.items()
        ]
    )
    weighted = [
        (c.num_requests, c.attainment) for c in classes.values() if c.attainment is not None and c.num_requests > 0
    ]
    total_weight = sum(w for w, _ in weighted)
    attainment = sum(w * a for w, a in weighted if a is not None) / total_weight if total_weight > 0 else None

    finished_per_s = rejected_per_s = arrival_per_s = None
    if increases is not None:
        finished_per_s = sum(increases.finished_per_s_by_class.values())
        rejected_per_s = sum(increases.rejected_per_s_by_class.values())
        if increases.in_system_growth_per_s is not None:
            arrival_per_s = max(0.0, finished_per_s + rejected_per_s + increases.in_system_growth_per_s)

    running = sum(gauges.running_by_class.values()) if "running" not in _missing_gauges(gauges) else None
    waiting = sum(gauges.waiting_by_class.values()) if "waiting" not in _missing_gauges(gauges) else None
    return ObservedWindow(
        start_s=start_s,
        end_s=end_s,
        quantile=quantile,
        num_pods_expected=coverage.num_pods_expected,
        num_pods_sampled=coverage.num_pods_sampled,
        num_pods_with_delta=0 if increases is None else increases.num_pods,
        complete=not problems,
        reason="; ".join(problems),
        classes=classes,
        num_requests=round(ttft_all.count) if ttft_all is not None else 0,
        ttft_quantile_s=histogram_quantile(quantile, ttft_all) if ttft_all is not None else None,
        tpot_quantile_s=histogram_quantile(quantile, tpot_all) if tpot_all is not None else None,
        ttft_mean_s=ttft_all.mean if ttft_all is not None else None,
        tpot_mean_s=tpot_all.mean if tpot_all is not None else None,
        ttft_attainment=ttft_attainment,
        tpot_attainment=tpot_attainment,
        slo_attainment=attainment,
        finished_per_s=finished_per_s,
        arrival_per_s=arrival_per_s,
        rejected_per_s=rejected_per_s,
        mean_service_s=service_all.mean if service_all is not None else None,
        num_running=running,
        num_waiting=waiting,
        kv_usage=gauges.kv_usage,
        kv_usage_max=gauges.kv_usage_max,
        gpu_utilization=gauges.gpu_utilization,
        num_counter_resets=coverage.num_counter_resets,
    )


def _missing_gauges(gauges: Gauges) -> set[str]:
    # A gauge family with no series at all is unknown; a family with per-class zeros is a real zero.
    missing = set()
    if not gauges.running_by_class:
        missing.add("running")
    if not gauges.waiting_by_class:
        missing.add("waiting")
    return missing


def _class_window(
    name: str, increases: Increases | None, gauges: Gauges, *, spec: spec_mod.PolicySpec, quantile: float
) -> ClassWindow:
    ttft_target_s, tpot_target_s = spec.targets_for(name)
    ttft = increases.ttft_by_class.get(name) if increases is not None else None
    tpot = increases.tpot_by_class.get(name) if increases is not None else None
    return ClassWindow(
        name=name,
        num_requests=round(ttft.count) if ttft is not None else 0,
        ttft_quantile_s=histogram_quantile(quantile, ttft) if ttft is not None else None,
        tpot_quantile_s=histogram_quantile(quantile, tpot) if tpot is not None else None,
        ttft_attainment=histogram_fraction_at_most(ttft_target_s, ttft)
        if ttft is not None and ttft_target_s is not None
        else None,
        tpot_attainment=histogram_fraction_at_most(tpot_target_s, tpot)
        if tpot is not None and tpot_target_s is not None
        else None,
        finished_per_s=increases.finished_per_s_by_class.get(name, 0.0) if increases is not None else None,
        rejected_per_s=increases.rejected_per_s_by_class.get(name, 0.0) if increases is not None else None,
        num_running=gauges.running_by_class.get(name) if gauges.running_by_class else None,
        num_waiting=gauges.waiting_by_class.get(name) if gauges.waiting_by_class else None,
    )


def _counter_deltas(now: Mapping[str, float], before: Mapping[str, float] | None) -> dict[str, float] | None:
    out: dict[str, float] = {}
    for name, value in now.items():
        earlier = 0.0 if before is None else before.get(name, 0.0)
        if value < earlier:
            return None
        out[name] = value - earlier
    return out


def _restarted(before: PodSample, now: PodSample) -> bool:
    if (
        before.started_at_s is not None
        and now.started_at_s is not None
        and now.started_at_s > before.started_at_s + 1e-6
    ):
        return True
    return (
        per_class_deltas(now.ttft_by_class, before.ttft_by_class) is None
        or per_class_deltas(now.tpot_by_class, before.tpot_by_class) is None
        or per_class_deltas(now.service_by_class, before.service_by_class) is None
        or _counter_deltas(now.finished_by_class, before.finished_by_class) is None
        or _counter_deltas(now.rejected_by_class, before.rejected_by_class) is None
    )


def from_scrapes(  # noqa: PLR0912, PLR0915 - one pass over the pods that sums a dozen accumulators the window is built from
    previous: Mapping[str, PodSample],
    current: Mapping[str, PodSample],
    *,
    expected_pods: Collection[str],
    spec: spec_mod.PolicySpec,
    now_s: float,
    max_age_s: float,
) -> ObservedWindow:
    """The window between two scrapes of the fleet.

    `expected_pods`: the pods that are ready now (the collector tried each). `previous`/`current`: the
    last and this scrape, keyed by pod name; pods may be missing from either. A current scrape older than
    `max_age_s` is stale and left out. A pod with no earlier scrape counts from zero only when its series
    were created inside the window (it started then); otherwise its growth is unknown and the window is
    partial. A pod whose counters went backwards (restart) counts from zero, like Prometheus' increase().
    """
    expected = sorted(set(expected_pods))
    problems: list[str] = []
    fresh: list[PodSample] = []
    unscraped = [p for p in expected if p not in current]
    if unscraped:
        problems.append(
            f"{len(expected) - len(unscraped)}/{len(expected)} pods scraped (missing: {', '.join(unscraped)})"
        )
    for pod in expected:
        sample = current.get(pod)
        if sample is None:
            continue
        age_s = now_s - sample.scraped_at_s
        if age_s > max_age_s:
            problems.append(f"stale scrape of {pod} ({age_s:.0f}s old > {max_age_s:.0f}s)")
            continue
        absent = sorted(REQUIRED_FIELDS & sample.missing)
        if absent:
            problems.append(f"{pod} lacks {', '.join(absent)}")
        fresh.append(sample)

    coverage_base = dict(num_pods_expected=len(expected), num_pods_sampled=len(fresh))
    if not fresh:
        return build(
            None,
            None,
            coverage=Coverage(problems=tuple(problems), **coverage_base),
            spec=spec,
            start_s=now_s,
            end_s=now_s,
        )

    baselines = [
        previous[s.pod].scraped_at_s
        for s in fresh
        if s.pod in previous and previous[s.pod].scraped_at_s < s.scraped_at_s
    ]
    window_start_s = min(baselines) if baselines else None
    end_s = max(s.scraped_at_s for s in fresh)

    ttft: dict[str, Histogram] = {}
    tpot: dict[str, Histogram] = {}
    service: dict[str, Histogram] = {}
    finished_per_s: dict[str, float] = {}
    rejected_per_s: dict[str, float] = {}
    growth_per_s = 0.0
    growth_known = True
    counted = 0
    resets = 0
    no_baseline: list[str] = []
    mismatched: list[str] = []
    spans: list[float] = []
    for sample in fresh:
        before = previous.get(sample.pod)
        if before is not None and before.scraped_at_s >= sample.scraped_at_s:
            before = None
        if before is not None and _restarted(before, sample):
            resets += 1
            before = PodSample(pod=sample.pod, scraped_at_s=before.scraped_at_s)  # counts since the restart
        if before is None:
            started = sample.ready_at_s if sample.ready_at_s is not None else sample.started_at_s
            if window_start_s is None or started is None or started < window_start_s:
                no_baseline.append(sample.pod)
                continue
            before = PodSample(pod=sample.pod, scraped_at_s=started)  # born inside the window: all of it is new
        span_s = sample.scraped_at_s - before.scraped_at_s
        deltas = (
            per_class_deltas(sample.ttft_by_class, before.ttft_by_class),
            per_class_deltas(sample.tpot_by_class, before.tpot_by_class),
            per_class_deltas(sample.service_by_class, before.service_by_class),
        )
        finished = _counter_deltas(sample.finished_by_class, before.finished_by_class)
        rejected = _counter_deltas(sample.rejected_by_class, before.rejected_by_class)
        if span_s <= 0 or any(d is None for d in deltas) or finished is None or rejected is None:
            no_baseline.append(sample.pod)
            continue
        ttft_d, tpot_d, service_d = (d or {} for d in deltas)
        if not (add_per_class(ttft, ttft_d) and add_per_class(tpot, tpot_d) and add_per_class(service, service_d)):
            mismatched.append(sample.pod)
            continue
        for name, value in finished.items():
            finished_per_s[name] = finished_per_s.get(name, 0.0) + value / span_s
        for name, value in rejected.items():
            rejected_per_s[name] = rejected_per_s.get(name, 0.0) + value / span_s
        in_now = _in_system(sample)
        in_before = _in_system(before) if before.running_by_class or before.waiting_by_class else 0.0
        if in_now is None or in_before is None:
            growth_known = False
        else:
            growth_per_s += (in_now - in_before) / span_s
        counted += 1
        spans.append(span_s)

    if no_baseline:
        problems.append(f"no baseline scrape for {', '.join(no_baseline)}")
    if mismatched:
        problems.append(f"histogram buckets differ on {', '.join(mismatched)}")

    increases = None
    if counted:
        increases = Increases(
            window_s=sum(spans) / len(spans),
            num_pods=counted,
            ttft_by_class=ttft,
            tpot_by_class=tpot,
            service_by_class=service,
            finished_per_s_by_class=finished_per_s,
            rejected_per_s_by_class=rejected_per_s,
            in_system_growth_per_s=growth_per_s if growth_known else None,
        )
    gauges = _gauges(fresh)
    start_s = window_start_s if window_start_s is not None else end_s
    return build(
        increases,
        gauges,
        coverage=Coverage(problems=tuple(problems), num_counter_resets=resets, **coverage_base),
        spec=spec,
        start_s=start_s,
        end_s=end_s,
    )


def _in_system(sample: PodSample) -> float | None:
    if "running" in sample.missing or "waiting" in sample.missing:
        return None
    return sum(sample.running_by_class.values()) + sum(sample.waiting_by_class.values())


def _gauges(samples: list[PodSample]) -> Gauges:
    running: dict[str, float] = {}
    waiting: dict[str, float] = {}
    for sample in samples:
        for name, value in sample.running_by_class.items():
            running[name] = running.get(name, 0.0) + value
        for name, value in sample.waiting_by_class.items():
            waiting[name] = waiting.get(name, 0.0) + value
    kv = [s.kv_usage for s in samples if s.kv_usage is not None and math.isfinite(s.kv_usage)]
    gpu = [s.gpu_utilization for s in samples if s.gpu_utilization is not None and math.isfinite(s.gpu_utilization)]
    return Gauges(
        running_by_class=running,
        waiting_by_class=waiting,
        kv_usage=sum(kv) / len(kv) if kv else None,
        kv_usage_max=max(kv) if kv else None,
        gpu_utilization=sum(gpu) / len(gpu) if gpu else None,
    )
