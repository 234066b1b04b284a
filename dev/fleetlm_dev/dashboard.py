"""The Grafana dashboard shipped in the Helm chart, generated from the metric names in code.

Panels read only names from `fleetlm_runtime.contract` (the runtime's metrics) and
`fleetlm_operator.metrics` (the operator's), so a renamed metric changes the dashboard in the same
commit; a test fails when the committed JSON differs from what this module generates.
`python -m fleetlm_dev.dashboard` rewrites it, `--check` only compares.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from fleetlm_dev import paths
from fleetlm_operator import metrics as operator_metrics
from fleetlm_runtime import contract

DASHBOARD_PATH = paths.repo_root() / "helm" / "fleetlm" / "files" / "grafana-dashboard.json"
SELECTOR = 'namespace=~"$namespace", service=~"$service"'


def _name(metric: Any) -> str:
    return str(metric._name)


def _panel(
    panel_id: int, title: str, targets: list[tuple[str, str]], *, unit: str, x: int, y: int, description: str
) -> dict[str, Any]:
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom"}},
        "targets": [
            {"expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i)}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


# The latency panels read the percentile from a dashboard variable: the targets beside them hold at the
# LLMService's spec.slo.percentile, which is no label of any metric.
PERCENTILE = "$percentile"


def _quantile(metric: str, q: str) -> str:
    return (
        f"histogram_quantile({q}, sum by (le, {contract.LABEL_QOS_CLASS}) "
        f"(rate({metric}_bucket{{{SELECTOR}}}[$__rate_interval])))"
    )


def build() -> dict[str, Any]:
    target = _name(operator_metrics.SERVICE_SLO_TARGET)
    replicas = _name(operator_metrics.SERVICE_REPLICAS)
    limits = _name(operator_metrics.SERVICE_BATCH_LIMIT)
    decisions = _name(operator_metrics.DECISIONS)
    op_selector = 'namespace=~"$namespace", llmservice=~"$service"'
    rows = [
        (
            f"TTFT p{PERCENTILE} per class vs SLO",
            [
                (
                    _quantile(contract.TIME_TO_FIRST_TOKEN_SECONDS, f"{PERCENTILE} / 100"),
                    f"p{PERCENTILE} {{{{qos_class}}}}",
                ),
                (f'max({target}{{{op_selector}, slo="ttft"}})', "target"),
            ],
            "s",
            "Time to first token at the dashboard's percentile per QoS class, with the LLMService's target "
            "(set the percentile to its spec.slo.percentile).",
        ),
        (
            f"TPOT p{PERCENTILE} per class vs SLO",
            [
                (
                    _quantile(contract.REQUEST_TIME_PER_OUTPUT_TOKEN_SECONDS, f"{PERCENTILE} / 100"),
                    f"p{PERCENTILE} {{{{qos_class}}}}",
                ),
                (f'max({target}{{{op_selector}, slo="tpot"}})', "target"),
            ],
            "s",
            "Time per output token at the dashboard's percentile per QoS class, with the target (set the "
            "percentile to the LLMService's spec.slo.percentile).",
        ),
        (
            "Replicas",
            [
                (f"sum by (state) ({replicas}{{{op_selector}}})", "{{state}}"),
            ],
            "short",
            "Runtime replicas the operator wants and those ready.",
        ),
        (
            "Batch limits",
            [
                (f"max by (limit) ({limits}{{{op_selector}}})", "{{limit}}"),
            ],
            "short",
            "max_batch_size and max_batch_tokens the tuner currently applies (no pod restarts).",
        ),
        (
            "Queue depth per class",
            [
                (
                    f"sum by ({contract.LABEL_QOS_CLASS}) ({contract.NUM_REQUESTS_WAITING}{{{SELECTOR}}})",
                    "waiting {{qos_class}}",
                ),
                (
                    f"sum by ({contract.LABEL_QOS_CLASS}) ({contract.NUM_REQUESTS_RUNNING}{{{SELECTOR}}})",
                    "running {{qos_class}}",
                ),
            ],
            "short",
            "Requests waiting and running, per QoS class, over all pods.",
        ),
        (
            "KV cache usage",
            [
                (f"avg({contract.KV_CACHE_USAGE_PERC}{{{SELECTOR}}})", "mean"),
                (f"max({contract.KV_CACHE_USAGE_PERC}{{{SELECTOR}}})", "max pod"),
            ],
            "percentunit",
            "Fraction of the KV cache in use.",
        ),
        (
            "GPU utilization",
            [
                (f"avg({contract.GPU_UTILIZATION_RATIO}{{{SELECTOR}}})", "mean"),
            ],
            "percentunit",
            "NVML utilization of the runtime pods' GPUs (absent on CPU-only pods).",
        ),
        (
            "Tuning decisions",
            [
                (f"sum by (action) (increase({decisions}_total[$__rate_interval]))", "{{action}}"),
            ],
            "short",
            "What the SLO tuner did: scale, resize batches, shed or restore classes.",
        ),
        (
            "Rejections by reason",
            [
                (
                    f"sum by ({contract.LABEL_REASON}) (rate({contract.REQUESTS_REJECTED}_total{{{SELECTOR}}}"
                    "[$__rate_interval]))",
                    "{{reason}}",
                ),
            ],
            "reqps",
            "Requests refused, by cause: 429 queue_full, shed_slo_guard (the runtime sheds a class to "
            "protect others), shed_tuner (the operator sheds at max replicas); 400 invalid or too_long; 503 "
            "draining or loading.",
        ),
        (
            "Throughput",
            [
                (f"sum(rate({contract.GENERATION_TOKENS}_total{{{SELECTOR}}}[$__rate_interval]))", "output tokens/s"),
                (f"sum(rate({contract.PROMPT_TOKENS}_total{{{SELECTOR}}}[$__rate_interval]))", "prompt tokens/s"),
            ],
            "short",
            "Tokens per second over all pods.",
        ),
        (
            "Usage per tenant and class",
            [
                (
                    f"sum by ({contract.LABEL_TENANT}, {contract.LABEL_QOS_CLASS}) "
                    f"(rate({contract.USAGE_GENERATION_TOKENS}_total{{{SELECTOR}}}[$__rate_interval]))",
                    "generated {{tenant}}/{{qos_class}}",
                ),
                (
                    f"sum by ({contract.LABEL_TENANT}, {contract.LABEL_QOS_CLASS}) "
                    f'(rate({contract.USAGE_PROMPT_TOKENS}_total{{{SELECTOR}, {contract.LABEL_SOURCE}="computed"}}'
                    "[$__rate_interval]))",
                    "prompt computed {{tenant}}/{{qos_class}}",
                ),
                (
                    f"sum by ({contract.LABEL_TENANT}, {contract.LABEL_QOS_CLASS}) "
                    f'(rate({contract.USAGE_PROMPT_TOKENS}_total{{{SELECTOR}, {contract.LABEL_SOURCE}="prefix_cache"}}'
                    "[$__rate_interval]))",
                    "prompt from prefix cache {{tenant}}/{{qos_class}}",
                ),
                (
                    f"sum by ({contract.LABEL_TENANT}, {contract.LABEL_QOS_CLASS}) "
                    f"(rate({contract.USAGE_RESPONSE_CACHE_TOKENS}_total{{{SELECTOR}}}[$__rate_interval]))",
                    "from response cache {{tenant}}/{{qos_class}}",
                ),
                (
                    f"sum by ({contract.LABEL_TENANT}, {contract.LABEL_QOS_CLASS}) "
                    f"(rate({contract.USAGE_ENGINE_SECONDS}_total{{{SELECTOR}}}[$__rate_interval]))",
                    "engine-s/s {{tenant}}/{{qos_class}}",
                ),
            ],
            "short",
            "The usage ledger (also GET /admin/usage): tokens per second per tenant (API key digest; "
            "'other' without a known key) and class, by source, and engine-seconds per second attributed by "
            "each step's token share (1.0 = one engine busy all the time for that tenant).",
        ),
    ]
    panels = [
        _panel(i + 1, title, targets, unit=unit, x=(i % 2) * 12, y=(i // 2) * 8, description=desc)
        for i, (title, targets, unit, desc) in enumerate(rows)
    ]
    variable = {
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "current": {"text": "All", "value": "$__all"},
    }
    return {
        "title": "FleetLM: LLM services against their SLOs",
        "uid": "fleetlm-slo",
        "tags": ["fleetlm", "llm", "slo"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
                {
                    **variable,
                    "name": "namespace",
                    "label": "Namespace",
                    "query": f"label_values({replicas}, namespace)",
                },
                {
                    **variable,
                    "name": "service",
                    "label": "LLMService",
                    "query": f'label_values({replicas}{{namespace=~"$namespace"}}, llmservice)',
                },
                {
                    "name": "percentile",
                    "type": "custom",
                    "label": "SLO percentile",
                    "query": "50,90,95,99,99.9",
                    "current": {"text": "95", "value": "95"},
                    "includeAll": False,
                    "multi": False,
                    "description": "The LLMService's spec.slo.percentile, at which the latency panels read.",
                },
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleetlm_dev.dashboard", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed dashboard is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not DASHBOARD_PATH.exists() or DASHBOARD_PATH.read_text() != text:
            print(f"{DASHBOARD_PATH} is stale: run `python -m fleetlm_dev.dashboard`", file=sys.stderr)
            return 1
        return 0
    DASHBOARD_PATH.parent.mkdir(parents=True, exist_ok=True)
    DASHBOARD_PATH.write_text(text)
    print(f"wrote {DASHBOARD_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
