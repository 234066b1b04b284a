"""What an LLMService's status says about its pods: phase, replica counts and rollout conditions.

Pure: reads the Deployment and the runtime pods as the API server returns them (plain dicts) and
returns status fields plus conditions; `now` and the generation are parameters. Conditions about
latency (SLOMet, MetricsAvailable) belong to the tuner and are not decided here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from fleetlm_operator.api import names, status_models
from fleetlm_operator.status import conditions


@dataclasses.dataclass(frozen=True, slots=True)
class RolloutSummary:
    phase: status_models.Phase
    replicas: int  # pods that exist (what /scale reports as current)
    ready_replicas: int
    updated_replicas: int
    desired_replicas: int
    conditions: tuple[conditions.Condition, ...]


def _deployment_condition(deployment: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    return conditions.find(deployment.get("status", {}).get("conditions", []) or [], type_)


def _unschedulable(pods: Sequence[Mapping[str, Any]]) -> list[str]:
    """Messages of pods the scheduler could not place (no free GPU, no matching node, ...)."""
    messages = []
    for pod in pods:
        if pod.get("metadata", {}).get("deletionTimestamp"):
            continue
        scheduled = conditions.find(pod.get("status", {}).get("conditions", []) or [], "PodScheduled")
        if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
            messages.append(str(scheduled.get("message", "")))
    return messages


def summarize(
    *, deployment: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]], min_ready: int
) -> RolloutSummary:
    """Status of the runtime pods. `min_ready` is how many ready pods make the service Ready (>= 1)."""
    if deployment is None:
        return RolloutSummary(
            phase="Pending",
            replicas=0,
            ready_replicas=0,
            updated_replicas=0,
            desired_replicas=0,
            conditions=(
                conditions.Condition(
                    names.ConditionType.READY, "False", "DeploymentMissing", "the runtime Deployment does not exist yet"
                ),
                conditions.Condition(
                    names.ConditionType.PROGRESSING, "True", "Creating", "creating the runtime Deployment"
                ),
            ),
        )
    spec, status = deployment.get("spec", {}), deployment.get("status", {}) or {}
    desired = int(spec.get("replicas", 1) or 0)
    replicas = int(status.get("replicas", 0) or 0)
    ready = int(status.get("readyReplicas", 0) or 0)
    updated = int(status.get("updatedReplicas", 0) or 0)
    generation_seen = int(status.get("observedGeneration", 0) or 0) >= int(deployment["metadata"].get("generation", 0))
    rolled_out = generation_seen and updated >= desired and replicas == desired and ready >= desired
    progress = _deployment_condition(deployment, "Progressing")
    deadline_exceeded = progress is not None and progress.get("status") == "False"
    unschedulable = _unschedulable(pods)
    found = [
        _ready_condition(desired=desired, ready=ready, min_ready=min_ready),
        _progressing_condition(
            progress if deadline_exceeded else None,
            rolled_out=rolled_out,
            desired=desired,
            updated=updated,
            ready=ready,
        ),
        _capacity_condition(unschedulable),
    ]

    phase: status_models.Phase
    if deadline_exceeded:
        phase = "Failed"  # the Deployment gave up: progress deadline exceeded
    elif desired and ready >= desired and rolled_out:
        phase = "Ready"
    elif ready == 0:
        phase = "Pending"  # nothing serves yet: pulling, loading the model, or unschedulable
    elif unschedulable:
        phase = "Degraded"  # serving, but below the requested replicas for lack of capacity
    else:
        phase = "Progressing"
    return RolloutSummary(
        phase=phase,
        replicas=replicas,
        ready_replicas=ready,
        updated_replicas=updated,
        desired_replicas=desired,
        conditions=tuple(found),
    )


def _ready_condition(*, desired: int, ready: int, min_ready: int) -> conditions.Condition:
    need = max(1, min(min_ready, desired)) if desired else 0
    if desired == 0:
        return conditions.Condition(names.ConditionType.READY, "False", "ScaledToZero", "no replicas requested")
    if ready >= need:
        return conditions.Condition(
            names.ConditionType.READY, "True", "ReplicasReady", f"{ready}/{desired} runtime pods ready"
        )
    return conditions.Condition(
        names.ConditionType.READY, "False", "ReplicasNotReady", f"{ready}/{desired} runtime pods ready"
    )


def _progressing_condition(
    exceeded: Mapping[str, Any] | None, *, rolled_out: bool, desired: int, updated: int, ready: int
) -> conditions.Condition:
    """`exceeded`: the Deployment's own Progressing condition once it has given up (status False), else None."""
    if exceeded is not None:
        return conditions.Condition(
            names.ConditionType.PROGRESSING,
            "False",
            str(exceeded.get("reason", "ProgressDeadlineExceeded")),
            str(exceeded.get("message", "")),
        )
    if rolled_out:
        return conditions.Condition(
            names.ConditionType.PROGRESSING, "False", "RolloutComplete", f"{desired} replicas up to date"
        )
    return conditions.Condition(
        names.ConditionType.PROGRESSING, "True", "RollingOut", f"{updated}/{desired} replicas updated, {ready} ready"
    )


def _capacity_condition(unschedulable: Sequence[str]) -> conditions.Condition:
    if unschedulable:
        return conditions.Condition(
            names.ConditionType.CAPACITY_UNAVAILABLE,
            "True",
            "Unschedulable",
            f"{len(unschedulable)} pod(s) cannot be scheduled: {unschedulable[0]}",
        )
    return conditions.Condition(
        names.ConditionType.CAPACITY_UNAVAILABLE, "False", "Scheduled", "every runtime pod is placed"
    )
