"""The router's Prometheus collectors (its own registry; labels bounded by the replica count).

Series of a replica that left are removed, so the label set never grows with pod churn.
"""

from __future__ import annotations

import contextlib
from typing import Any

import prometheus_client
from prometheus_client import registry

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST

PICKS = "fleetlm_router_picks"  # counter {replica, reason}: affinity | spill | least_loaded | new_prefix | round_robin
RETRIES = "fleetlm_router_retries"  # counter {reason}: connect_error | unavailable
IN_FLIGHT = "fleetlm_router_in_flight"  # gauge {replica}
READY_REPLICAS = "fleetlm_router_ready_replicas"  # gauge
HELD = "fleetlm_router_held_requests"  # gauge: requests waiting for a replica now
HOLD_SECONDS = "fleetlm_router_hold_seconds"  # histogram {outcome}: served | timeout | gone
REJECTED = "fleetlm_router_rejected"  # counter {qos_class, reason}
UPSTREAM_LOST = "fleetlm_router_upstream_lost"  # counter: streams cut by their replica after the first byte
SCALE_UP_REQUESTS = "fleetlm_router_scale_up_requests"  # counter {result}: sent | failed
# What each replica's /metrics last said (vLLM names there), as the picker reads it.
REPLICA_WAITING = "fleetlm_router_replica_waiting"  # gauge {replica}: queued requests at the last scrape
REPLICA_RUNNING = "fleetlm_router_replica_running"  # gauge {replica}: running requests at the last scrape
REPLICA_KV_USAGE = "fleetlm_router_replica_kv_usage"  # gauge {replica}: KV-cache usage 0-1 at the last scrape
SCRAPES = "fleetlm_router_scrapes"  # counter {result}: ok | failed

REJECT_OVERLOADED = "overloaded"  # 429: the class rules at the edge (shed class, hold queue full)
REJECT_NO_REPLICA = "no_replica"  # 503: none ready and holding is off or full
REJECT_HOLD_TIMEOUT = "hold_timeout"  # 503: none became ready within the hold bound
REJECT_ALL_FAILED = "all_failed"  # 502: every replica tried failed before answering
REJECT_INVALID = "invalid"  # 4xx from the router itself (body too large, class not allowed)

HOLD_BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


class RouterMetrics:
    def __init__(self) -> None:
        prometheus_client.disable_created_metrics()
        self.registry = registry.CollectorRegistry(auto_describe=True)
        r = self.registry
        self.picks = prometheus_client.Counter(
            PICKS, "Requests sent to a replica, by why.", ["replica", "reason"], registry=r
        )
        self.retries = prometheus_client.Counter(
            RETRIES, "Attempts retried on another replica before the first byte.", ["reason"], registry=r
        )
        self.in_flight = prometheus_client.Gauge(
            IN_FLIGHT, "Requests the router has open on each replica.", ["replica"], registry=r
        )
        self.ready = prometheus_client.Gauge(READY_REPLICAS, "Ready replicas the router may send to.", registry=r)
        self.held = prometheus_client.Gauge(HELD, "Requests held while no replica is ready.", registry=r)
        self.hold_seconds = prometheus_client.Histogram(
            HOLD_SECONDS, "Time a request waited for a ready replica.", ["outcome"], buckets=HOLD_BUCKETS_S, registry=r
        )
        self.rejected = prometheus_client.Counter(
            REJECTED, "Requests the router answered itself with an error.", ["qos_class", "reason"], registry=r
        )
        self.upstream_lost = prometheus_client.Counter(
            UPSTREAM_LOST, "Streams cut by their replica mid-way.", registry=r
        )
        self.scale_up = prometheus_client.Counter(
            SCALE_UP_REQUESTS, "Scale-up requests sent while holding.", ["result"], registry=r
        )
        self.replica_waiting = prometheus_client.Gauge(
            REPLICA_WAITING, "Queued requests a replica reported at the last scrape.", ["replica"], registry=r
        )
        self.replica_running = prometheus_client.Gauge(
            REPLICA_RUNNING, "Running requests a replica reported at the last scrape.", ["replica"], registry=r
        )
        self.replica_kv_usage = prometheus_client.Gauge(
            REPLICA_KV_USAGE, "KV-cache usage (0-1) a replica reported at the last scrape.", ["replica"], registry=r
        )
        self.scrapes = prometheus_client.Counter(
            SCRAPES, "Scrapes of the replicas' /metrics, by result.", ["result"], registry=r
        )
        for result in ("ok", "failed"):
            self.scrapes.labels(result)
        for reason in ("connect_error", "unavailable"):
            self.retries.labels(reason)
        for outcome in ("served", "timeout", "gone"):
            self.hold_seconds.labels(outcome)
        for result in ("sent", "failed"):
            self.scale_up.labels(result)
        self._replicas: set[str] = set()

    def set_replicas(self, names: set[str]) -> None:
        for gone in self._replicas - names:
            self.in_flight.remove(gone)
            for gauge in (self.replica_waiting, self.replica_running, self.replica_kv_usage):
                with contextlib.suppress(KeyError):
                    gauge.remove(gone)
            for reason in ("affinity", "spill", "least_loaded", "new_prefix", "round_robin"):
                with contextlib.suppress(KeyError):
                    self.picks.remove(gone, reason)
        for new in names - self._replicas:
            self.in_flight.labels(new).set(0)
        self._replicas = set(names)
        self.ready.set(len(names))

    def record_scrape(self, replica: str, reported: Any) -> None:
        """One scrape's outcome (a `scrape.Reported`, or None when it failed); gone replicas get no series."""
        if reported is None:
            self.scrapes.labels("failed").inc()
            return
        self.scrapes.labels("ok").inc()
        if replica in self._replicas:
            self.replica_waiting.labels(replica).set(reported.waiting)
            self.replica_running.labels(replica).set(reported.running)
            if reported.kv_usage is not None:
                self.replica_kv_usage.labels(replica).set(reported.kv_usage)

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)
