"""Prometheus text exposition, byte for byte what `prometheus_client.generate_latest` writes, but cheaper.

An endpoint picker scrapes every replica at 20 Hz (the Inference Extension's default 50 ms tick), and the
scrape is served on the same event loop as the token streams. `generate_latest` re-validates and
re-escapes every label of every sample on each call, which is most of its cost; here the text before a
sample's value (`name{label="value",...} `) and each family's `# HELP`/`# TYPE` lines are built once per
series and kept, so a scrape only formats the values. Label sets are bounded by design (model, class,
finished reason, bucket), so the cache is too. `tests/runtime/test_exposition.py` checks the output
equals `generate_latest`'s on a populated registry, including escaping.
"""

from __future__ import annotations

from prometheus_client import exposition, registry
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

_OPENMETRICS_SUFFIXES = ("_created", "_gsum", "_gcount")  # moved to a gauge family of their own, as upstream
_TYPE_RENAMES = {"info": "gauge", "stateset": "gauge", "gaugehistogram": "histogram", "unknown": "untyped"}


def _render_one(name: str, labels: dict[str, str], value: float, timestamp: float | None) -> str:
    """One sample line, by prometheus-client itself (so escaping rules stay theirs)."""
    family = Metric(name, "", "unknown")
    family.add_sample(name, labels, value, timestamp)
    line = exposition.generate_latest(_One(family)).decode("utf-8")
    return line.splitlines(keepends=True)[-1]


class _One(registry.Collector):
    def __init__(self, family: Metric) -> None:
        self._family = family

    def collect(self) -> list[Metric]:
        return [self._family]


class CachedExposition:
    """Renders a registry like `generate_latest`, caching each series' prefix and each family's header."""

    def __init__(self) -> None:
        self._prefixes: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
        self._headers: dict[tuple[str, str, str], str] = {}

    def _prefix(self, name: str, labels: dict[str, str]) -> str:
        key = (name, tuple(labels.items()))
        prefix = self._prefixes.get(key)
        if prefix is None:
            line = _render_one(name, labels, 0.0, None)
            prefix = line[: line.rindex(" ") + 1]  # everything before the value
            self._prefixes[key] = prefix
        return prefix

    def _header(self, name: str, kind: str, documentation: str) -> str:
        key = (name, kind, documentation)
        header = self._headers.get(key)
        if header is None:
            exposed = name + ("_total" if kind == "counter" else "_info" if kind == "info" else "")
            text = documentation.replace("\\", r"\\").replace("\n", r"\n")
            header = f"# HELP {exposed} {text}\n# TYPE {exposed} {_TYPE_RENAMES.get(kind, kind)}\n"
            self._headers[key] = header
        return header

    def render(self, collector: registry.Collector) -> bytes:
        out: list[str] = []
        append = out.append
        for metric in collector.collect():
            append(self._header(metric.name, metric.type, metric.documentation))
            moved: dict[str, list[str]] = {}
            for sample in metric.samples:
                line = self._prefix(sample.name, sample.labels) + floatToGoString(sample.value)
                if sample.timestamp is not None:
                    line += f" {int(float(sample.timestamp) * 1000):d}"
                suffix = None
                if sample.name.endswith(_OPENMETRICS_SUFFIXES):  # rare: checked exactly only then
                    suffix = next((s for s in _OPENMETRICS_SUFFIXES if sample.name == metric.name + s), None)
                if suffix is None:
                    append(line + "\n")
                else:
                    moved.setdefault(suffix, []).append(line + "\n")
            for suffix, lines in sorted(moved.items()):
                append(self._header(metric.name + suffix, "gauge", metric.documentation))
                out.extend(lines)
        return "".join(out).encode("utf-8")
