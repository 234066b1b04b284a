"""Prometheus text exposition of one runtime pod -> `window.PodSample`. Pure: text in, value out.

Metric names come from `fleetlm_runtime.contract`, never spelled here, so a renamed metric breaks a test
rather than the tuning loop. A family the scrape does not carry is named in `PodSample.missing` and left
absent, never filled with zero; a family that is declared but has no series yet (a histogram before its
first observation) is a real zero. NaN gauge values count as absent. This is the only operator module
that imports prometheus_client; it does no I/O (the scraper hands it the body and the scrape time).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from prometheus_client import parser as prom_parser
from prometheus_client import samples as prom_samples

from fleetlm_operator.policy import histogram, window
from fleetlm_runtime import contract

# Histograms the window reads, by the PodSample field they fill.
_HISTOGRAMS = {
    contract.TIME_TO_FIRST_TOKEN_SECONDS: "ttft",
    contract.REQUEST_TIME_PER_OUTPUT_TOKEN_SECONDS: "tpot",
    contract.REQUEST_INFERENCE_TIME_SECONDS: "service",
}
# Counter families that may legitimately have no series (created on first event, like rejections):
# their absence as a *family* still counts as missing, their emptiness does not.
_REJECT_REASONS_FOR_LOAD = frozenset(contract.REJECT_REASONS_OVERLOAD)


class MetricsParseError(ValueError):
    """The body is not Prometheus text exposition."""


def parse_pod_metrics(text: str, *, pod: str, scraped_at_s: float) -> window.PodSample:
    """Read one pod's `/metrics` body. Raises MetricsParseError when the text cannot be parsed."""
    try:
        families = {family.name: family for family in prom_parser.text_string_to_metric_families(text)}
    except (ValueError, IndexError, TypeError) as error:
        raise MetricsParseError(f"{pod}: unparseable metrics: {error}") from error

    missing: set[str] = set()
    # `_created` series (one per labelled child) say when each began; their minimum is about when the
    # process started, which tells a restart from a slow pod and a new pod from one we never saw.
    created = [
        float(s.value)
        for family in families.values()
        for s in family.samples
        if s.name.endswith("_created") and _finite(s.value)
    ]

    def by_class_sum(
        family_name: str, field: str, *, only: frozenset[str] | None = None, label: str = ""
    ) -> dict[str, float] | None:
        family = families.get(family_name) or families.get(contract.sample_name(family_name))
        if family is None:
            missing.add(field)
            return None
        out: dict[str, float] = {}
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            if only is not None and sample.labels.get(label) not in only:
                continue
            if not _finite(sample.value):
                continue
            qos_class = sample.labels.get(contract.LABEL_QOS_CLASS, "")
            out[qos_class] = out.get(qos_class, 0.0) + float(sample.value)
        return out

    running = by_class_sum(contract.NUM_REQUESTS_RUNNING, "running")
    waiting = by_class_sum(contract.NUM_REQUESTS_WAITING, "waiting")
    finished = by_class_sum(contract.REQUEST_SUCCESS, "finished")
    rejected = by_class_sum(
        contract.REQUESTS_REJECTED, "rejected", only=_REJECT_REASONS_FOR_LOAD, label=contract.LABEL_REASON
    )
    hists: dict[str, dict[str, histogram.Histogram]] = {}
    for family_name, field in _HISTOGRAMS.items():
        family = families.get(family_name)
        if family is None:
            missing.add(field)
            hists[field] = {}
            continue
        parsed, broken = _histograms_by_class(family.samples)
        if broken:
            missing.add(field)
        hists[field] = parsed

    kv_usage = _gauge_mean(families.get(contract.KV_CACHE_USAGE_PERC))
    if kv_usage is None:
        missing.add("kv_usage")
    gpu_utilization = _gauge_mean(families.get(contract.GPU_UTILIZATION_RATIO))
    if gpu_utilization is None:
        missing.add("gpu_utilization")  # normal on CPU pods; the window does not require it

    # The runtime's start-up timestamps (absent until they happen). Its `_created` series are off, so the
    # process start gauge is what tells a restart, and the ready time lets a new pod's first scrape count.
    process_start = _gauge_mean(families.get(contract.PROCESS_START_TIME_SECONDS))
    ready_at = _gauge_mean(families.get(contract.READY_TIME_SECONDS))

    applied: dict[str, str] = {}
    config = families.get(contract.CONFIG_INFO)
    if config is not None and config.samples:
        applied = {k: v for k, v in config.samples[0].labels.items() if k != contract.LABEL_MODEL}

    return window.PodSample(
        pod=pod,
        scraped_at_s=scraped_at_s,
        running_by_class=running or {},
        waiting_by_class=waiting or {},
        kv_usage=kv_usage,
        gpu_utilization=gpu_utilization,
        ttft_by_class=hists["ttft"],
        tpot_by_class=hists["tpot"],
        service_by_class=hists["service"],
        finished_by_class=finished or {},
        rejected_by_class=rejected or {},
        started_at_s=min(created) if created else process_start,
        ready_at_s=ready_at,
        applied=applied,
        missing=frozenset(missing),
    )


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _gauge_mean(family: object) -> float | None:
    samples = getattr(family, "samples", None)
    if not samples:
        return None
    values = [float(s.value) for s in samples if _finite(s.value)]
    return sum(values) / len(values) if values else None


def _histograms_by_class(samples: Iterable[prom_samples.Sample]) -> tuple[dict[str, histogram.Histogram], bool]:
    """Group `_bucket`/`_count`/`_sum` samples by class (summing over the model label).

    Returns the histograms and whether any series was malformed (no +Inf bucket, unparseable bound):
    such a class is left out, so the pod's data for this family is partial.
    """
    buckets: dict[str, dict[float, float]] = {}
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    broken = False
    for sample in samples:
        qos_class = sample.labels.get(contract.LABEL_QOS_CLASS, "")
        if sample.name.endswith("_bucket"):
            try:
                bound = float(sample.labels["le"])
            except (KeyError, ValueError):
                broken = True
                continue
            per_class = buckets.setdefault(qos_class, {})
            per_class[bound] = per_class.get(bound, 0.0) + float(sample.value)
        elif sample.name.endswith("_sum"):
            sums[qos_class] = sums.get(qos_class, 0.0) + float(sample.value)
        elif sample.name.endswith("_count"):
            counts[qos_class] = counts.get(qos_class, 0.0) + float(sample.value)
    out: dict[str, histogram.Histogram] = {}
    for qos_class, per_bound in buckets.items():
        infinite = per_bound.pop(math.inf, None)
        if infinite is None or any(not _finite(v) for v in per_bound.values()):
            broken = True
            continue
        bounds = tuple(sorted(per_bound))
        out[qos_class] = histogram.Histogram(
            bounds=bounds,
            cumulative=tuple(per_bound[b] for b in bounds),
            count=counts.get(qos_class, infinite),
            sum=sums.get(qos_class, 0.0),
        )
    return out, broken
