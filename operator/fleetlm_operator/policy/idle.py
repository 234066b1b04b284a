"""Scale to zero after an idle timeout: a pure decision, no clock and no I/O.

Inputs are wall-clock seconds the handler reads: the router's `fleetlm.dev/last-request-at` annotation
(stamped on every request it takes, at most once per its activity interval, and while requests are in
flight or held), and when the handler first saw this service at its current replica count (so a service
that never had traffic still idles down, and a fresh scale-up is not undone before the router's first
stamp lands). Only this policy ever writes 0; scaling up from 0 is the router's request through
`/scale`, never this policy's.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class IdleInput:
    now_s: float
    idle_timeout_s: float | None  # None: the service never idles down
    min_replicas: int
    desired_replicas: int  # what /scale says now (spec.replicas.effective)
    last_request_s: float | None  # the router's last stamp; None if it never stamped
    observed_since_s: float  # when the handler first saw the service at this replica count


@dataclasses.dataclass(frozen=True, slots=True)
class IdleDecision:
    replicas: int | None  # None: leave the count alone
    reason: str


def decide(state: IdleInput) -> IdleDecision:
    if state.idle_timeout_s is None or state.min_replicas > 0:
        return IdleDecision(None, "no idle timeout")
    if state.desired_replicas == 0:
        return IdleDecision(None, "already at zero; the router asks for a replica when a request comes")
    last = max(state.observed_since_s, state.last_request_s or 0.0)
    idle_s = state.now_s - last
    if idle_s >= state.idle_timeout_s:
        return IdleDecision(
            0, f"no request for {idle_s:.0f}s (idleTimeout {state.idle_timeout_s:.0f}s): scaling "
               f"{state.desired_replicas} -> 0; the router holds the next request while a replica starts",
        )  # fmt: skip
    return IdleDecision(None, f"last request {idle_s:.0f}s ago, idle timeout {state.idle_timeout_s:.0f}s")
