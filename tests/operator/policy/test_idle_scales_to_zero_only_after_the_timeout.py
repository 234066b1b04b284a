"""`policy.idle`: zero only after idleTimeout without a request, never below a min above zero, never up."""

from __future__ import annotations

import pytest

from fleetlm_operator.policy import idle


def _in(**kw: object) -> idle.IdleInput:
    base = {"now_s": 1000.0, "idle_timeout_s": 300.0, "min_replicas": 0, "desired_replicas": 2,
            "last_request_s": None, "observed_since_s": 0.0}  # fmt: skip
    return idle.IdleInput(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "replicas"),
    [
        ({"last_request_s": 600.0}, None),  # 400 s since the last request... but see the next row
        ({"last_request_s": 701.0}, None),  # 299 s: not yet
        ({"last_request_s": 700.0}, 0),  # exactly the timeout
        ({"last_request_s": 100.0}, 0),
        ({"last_request_s": None, "observed_since_s": 690.0}, 0),  # never a request, observed 310 s ago
        ({"last_request_s": None, "observed_since_s": 900.0}, None),  # a fresh scale-up is not undone
        ({"last_request_s": 100.0, "observed_since_s": 950.0}, None),  # old stamp, new count: its clock runs
        ({"last_request_s": 100.0, "idle_timeout_s": None}, None),  # no timeout: never
        ({"last_request_s": 100.0, "min_replicas": 1}, None),  # min above zero: never
        ({"last_request_s": 100.0, "desired_replicas": 0}, None),  # already there: nothing, and never up
    ],
)
def test_idle_decisions(kw: dict, replicas: int | None) -> None:
    state = _in(**kw)
    if kw == {"last_request_s": 600.0}:
        state = _in(last_request_s=600.0, now_s=899.0)
    decision = idle.decide(state)
    assert decision.replicas == replicas, decision.reason
    assert decision.reason
