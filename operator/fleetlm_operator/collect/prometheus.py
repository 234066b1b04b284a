"""Read the runtime pods' metrics from Prometheus (`metricsSource: prometheus`).

Prometheus already scrapes the pods (e.g. through the ServiceMonitor the operator creates), so the
operator asks it for every `fleetlm_*` series of the ready pods at one instant and rebuilds each pod's
exposition text, which `collect.parse` reads exactly as it reads a direct scrape: the same code decides
what is missing. A pod Prometheus has no fresh series for is reported missing, never read as zero.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import aiohttp

from fleetlm_operator.collect import parse
from fleetlm_operator.policy import window
from fleetlm_runtime import contract

_SUFFIXES = ("_bucket", "_sum", "_count", "_created", "_total")


@dataclasses.dataclass(frozen=True, slots=True)
class QueryResult:
    samples: dict[str, window.PodSample]
    errors: dict[str, str]


def _family_of(name: str) -> tuple[str, str | None]:
    """(family, type) of a sample name, from the contract's lists of counters, gauges and histograms."""
    if name in contract.GAUGES:
        return name, "gauge"
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            if base in contract.HISTOGRAMS:
                return base, "histogram"
            if base in contract.COUNTERS:
                return base, "counter"
    if name in contract.HISTOGRAMS:
        return name, "histogram"
    return name, None


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _regex_literal(text: str) -> str:
    """`text` matched literally by an RE2 regex inside a PromQL double-quoted string.

    Python's re.escape is not usable: it escapes characters such as '-' that PromQL's string syntax
    rejects. Only RE2 metacharacters are escaped, then backslashes are doubled for the string literal.
    """
    escaped = re.sub(r"([.^$*+?()\[\]{}|\\])", r"\\\1", text)
    return _escape(escaped)


def render_exposition(series: Iterable[tuple[Mapping[str, str], float]], *, drop_labels: Sequence[str]) -> str:
    """Prometheus text exposition of the given series (labels incl. __name__, value).

    Target labels that Prometheus added (pod, namespace, instance, job, ...) are dropped so the text
    reads like the pod's own /metrics.
    """
    by_family: dict[str, list[str]] = collections.defaultdict(list)
    types: dict[str, str] = {}
    for labels, value in series:
        name = labels["__name__"]
        family, kind = _family_of(name)
        if kind == "counter":
            # As prometheus-client's classic text format writes it: the TYPE line names `<family>_total`.
            family = f"{family}_total"
        if kind is not None:
            types[family] = kind
        pairs = ",".join(
            f'{key}="{_escape(val)}"'
            for key, val in sorted(labels.items())
            if key != "__name__" and key not in drop_labels
        )
        text_value = "NaN" if math.isnan(value) else repr(float(value))
        by_family[family].append(f"{name}{{{pairs}}} {text_value}" if pairs else f"{name} {text_value}")
    lines: list[str] = []
    for family in sorted(by_family):
        if family in types:
            lines.append(f"# TYPE {family} {types[family]}")
        lines.extend(sorted(by_family[family]))
    return "\n".join(lines) + "\n"


async def query_pods(
    base_url: str,
    *,
    namespace: str,
    pods: Sequence[str],
    at_s: float,
    pod_label: str = "pod",
    namespace_label: str = "namespace",
    timeout_s: float = 10.0,
    session: aiohttp.ClientSession | None = None,
) -> QueryResult:
    """Every fleetlm series of `pods` at time `at_s` (an instant query), one PodSample per pod found."""
    if not pods:
        return QueryResult(samples={}, errors={})
    pod_regex = "|".join(_regex_literal(pod) for pod in pods)
    query = (
        f'{{__name__=~"{_regex_literal(contract.METRIC_PREFIX)}.*", {namespace_label}="{_escape(namespace)}", '
        f'{pod_label}=~"{pod_regex}"}}'
    )
    own_session = session is None
    client = session or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s))
    try:
        async with client.get(
            base_url.rstrip("/") + "/api/v1/query", params={"query": query, "time": f"{at_s:.3f}"}
        ) as response:
            payload: dict[str, Any] = await response.json(content_type=None)
            if response.status != 200 or payload.get("status") != "success":
                reason = payload.get("error") or f"HTTP {response.status}"
                return QueryResult(samples={}, errors={pod: f"Prometheus query failed: {reason}" for pod in pods})
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        return QueryResult(samples={}, errors={pod: f"Prometheus unreachable: {error}" for pod in pods})
    finally:
        if own_session:
            await client.close()

    per_pod: dict[str, list[tuple[dict[str, str], float]]] = collections.defaultdict(list)
    for item in payload.get("data", {}).get("result", []):
        labels = dict(item.get("metric", {}))
        pod = labels.get(pod_label)
        if pod is None:
            continue
        per_pod[pod].append((labels, float(item["value"][1])))
    samples: dict[str, window.PodSample] = {}
    errors: dict[str, str] = {}
    drop = (pod_label, namespace_label, "instance", "job", "endpoint", "service", "container", "prometheus")
    for pod in pods:
        if pod not in per_pod:
            errors[pod] = f"Prometheus has no fresh series for pod {pod}"
            continue
        text = render_exposition(per_pod[pod], drop_labels=drop)
        try:
            samples[pod] = parse.parse_pod_metrics(text, pod=pod, scraped_at_s=at_s)
        except parse.MetricsParseError as error:
            errors[pod] = str(error)
    return QueryResult(samples=samples, errors=errors)
