"""The router's Prometheus collectors (its own registry; labels bounded by the replica count).

Series of a replica that left are removed, so the label set never grows with pod churn.
"""

from __future__ import annotations

import contextlib

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
            for reason in ("affinity", "spill", "least_loaded", "new_prefix", "round_robin"):
                with contextlib.suppress(KeyError):
                    self.picks.remove(gone, reason)
        for new in names - self._replicas:
            self.in_flight.labels(new).set(0)
        self._replicas = set(names)
        self.ready.set(len(names))

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)
