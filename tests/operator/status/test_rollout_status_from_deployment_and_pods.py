"""Phase and conditions follow the Deployment and its pods; transition times move only on change."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from fleetlm_operator.status import conditions, summary


def _deployment(
    *,
    desired: int,
    replicas: int,
    ready: int,
    updated: int,
    generation: int = 1,
    observed: int = 1,
    progressing: str = "True",
) -> dict[str, Any]:
    reason = "ProgressDeadlineExceeded" if progressing == "False" else "NewRSAvailable"
    return {
        "metadata": {"generation": generation},
        "spec": {"replicas": desired},
        "status": {
            "replicas": replicas,
            "readyReplicas": ready,
            "updatedReplicas": updated,
            "observedGeneration": observed,
            "conditions": [{"type": "Progressing", "status": progressing, "reason": reason}],
        },
    }


UNSCHEDULABLE_POD = {
    "metadata": {},
    "status": {
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
            }
        ]
    },
}


@pytest.mark.parametrize(
    ("deployment", "pods", "phase", "ready", "capacity"),
    [
        (None, [], "Pending", "False", None),
        (_deployment(desired=2, replicas=2, ready=2, updated=2), [], "Ready", "True", "False"),
        (_deployment(desired=2, replicas=2, ready=0, updated=2), [UNSCHEDULABLE_POD], "Pending", "False", "True"),
        (_deployment(desired=3, replicas=3, ready=1, updated=3), [UNSCHEDULABLE_POD], "Degraded", "True", "True"),
        (_deployment(desired=3, replicas=3, ready=1, updated=1), [], "Progressing", "True", "False"),
        (_deployment(desired=2, replicas=2, ready=0, updated=1, progressing="False"), [], "Failed", "False", "False"),
        (
            _deployment(desired=2, replicas=2, ready=2, updated=2, generation=2, observed=1),
            [],
            "Progressing",
            "True",
            "False",
        ),
    ],
)
def test_phase_and_conditions(
    deployment: dict | None, pods: list, phase: str, ready: str, capacity: str | None
) -> None:
    result = summary.summarize(deployment=deployment, pods=pods, min_ready=1)
    found = {c.type: c for c in result.conditions}
    assert result.phase == phase
    assert found["Ready"].status == ready
    if capacity is None:
        assert "CapacityUnavailable" not in found
    else:
        assert found["CapacityUnavailable"].status == capacity
    if capacity == "True":
        assert "Insufficient nvidia.com/gpu" in found["CapacityUnavailable"].message


def test_transition_time_moves_only_when_status_changes() -> None:
    t0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    t1 = t0 + datetime.timedelta(minutes=5)
    first = conditions.merge(
        [], [conditions.Condition("Ready", "False", "NotReady", "0/1")], now=t0, observed_generation=1
    )
    same = conditions.merge(
        first, [conditions.Condition("Ready", "False", "NotReady", "still 0/1")], now=t1, observed_generation=2
    )
    flipped = conditions.merge(
        same, [conditions.Condition("Ready", "True", "ReplicasReady", "1/1")], now=t1, observed_generation=2
    )
    assert same[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert same[0]["message"] == "still 0/1" and same[0]["observedGeneration"] == 2
    assert flipped[0]["lastTransitionTime"] == "2026-01-01T00:05:00Z"


def test_conditions_not_updated_are_kept() -> None:
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    kept = conditions.merge(
        [{"type": "SLOMet", "status": "True", "reason": "WithinTarget"}],
        [conditions.Condition("Ready", "True", "ReplicasReady")],
        now=now,
        observed_generation=1,
    )
    assert [c["type"] for c in kept] == ["Ready", "SLOMet"]
