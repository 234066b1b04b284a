"""The router's metric names are a contract too (dashboards, an HPA on held requests, the benchmark):
`fleetlm_router.metrics` names every family once, the router exports exactly those with their types, and
a replica that leaves takes its series with it (the label set never grows with pod churn)."""

from __future__ import annotations

from prometheus_client import parser

from fleetlm_router import metrics, scrape

DECLARED = {
    metrics.PICKS: "counter",
    metrics.RETRIES: "counter",
    metrics.IN_FLIGHT: "gauge",
    metrics.READY_REPLICAS: "gauge",
    metrics.HELD: "gauge",
    metrics.HOLD_SECONDS: "histogram",
    metrics.REJECTED: "counter",
    metrics.UPSTREAM_LOST: "counter",
    metrics.SCALE_UP_REQUESTS: "counter",
    metrics.REPLICA_WAITING: "gauge",
    metrics.REPLICA_RUNNING: "gauge",
    metrics.REPLICA_KV_USAGE: "gauge",
    metrics.SCRAPES: "counter",
}


def _families(m: metrics.RouterMetrics) -> dict[str, parser.Metric]:
    return {f.name: f for f in parser.text_string_to_metric_families(m.render().decode())}


def test_the_router_exports_exactly_the_declared_families() -> None:
    m = metrics.RouterMetrics()
    m.set_replicas({"pod-a"})
    m.record_scrape("pod-a", scrape.Reported(waiting=2, running=3, kv_usage=0.5))
    families = _families(m)
    assert {name: f.type for name, f in families.items()} == DECLARED
    for name in DECLARED:
        assert name.startswith("fleetlm_router_")
    # The names the README, the chart and the benchmark quote.
    text = m.render().decode()
    for sample in ("fleetlm_router_picks_total", "fleetlm_router_retries_total", "fleetlm_router_hold_seconds_bucket",
                   'fleetlm_router_in_flight{replica="pod-a"}', "fleetlm_router_held_requests",
                   'fleetlm_router_replica_waiting{replica="pod-a"} 2.0'):  # fmt: skip
        assert sample in text, sample


def test_a_replica_that_leaves_takes_its_series() -> None:
    m = metrics.RouterMetrics()
    m.set_replicas({"pod-a", "pod-b"})
    m.picks.labels("pod-a", "affinity").inc()
    m.record_scrape("pod-a", scrape.Reported(waiting=1, running=1, kv_usage=0.1))
    m.set_replicas({"pod-b"})
    text = m.render().decode()
    assert "pod-a" not in text and 'replica="pod-b"' in text
    m.record_scrape("pod-a", scrape.Reported(waiting=1, running=1, kv_usage=0.1))  # a late scrape of a gone pod
    assert "pod-a" not in m.render().decode()
