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

    found: list[conditions.Condition] = []
    need = max(1, min(min_ready, desired)) if desired else 0
    if desired == 0:
        found.append(conditions.Condition(names.ConditionType.READY, "False", "ScaledToZero", "no replicas requested"))
    elif ready >= need:
        found.append(
            conditions.Condition(
                names.ConditionType.READY, "True", "ReplicasReady", f"{ready}/{desired} runtime pods ready"
            )
        )
    else:
        found.append(
            conditions.Condition(
                names.ConditionType.READY, "False", "ReplicasNotReady", f"{ready}/{desired} runtime pods ready"
            )
        )

    progress = _deployment_condition(deployment, "Progressing")
    if progress and progress.get("status") == "False":
        found.append(
            conditions.Condition(
                names.ConditionType.PROGRESSING,
                "False",
                str(progress.get("reason", "ProgressDeadlineExceeded")),
                str(progress.get("message", "")),
            )
        )
    elif rolled_out:
        found.append(
            conditions.Condition(
                names.ConditionType.PROGRESSING, "False", "RolloutComplete", f"{desired} replicas up to date"
            )
        )
    else:
        found.append(
            conditions.Condition(
                names.ConditionType.PROGRESSING,
                "True",
                "RollingOut",
                f"{updated}/{desired} replicas updated, {ready} ready",
            )
        )

    unschedulable = _unschedulable(pods)
    if unschedulable:
        found.append(
            conditions.Condition(
                names.ConditionType.CAPACITY_UNAVAILABLE,
                "True",
                "Unschedulable",
                f"{len(unschedulable)} pod(s) cannot be scheduled: {unschedulable[0]}",
            )
        )
    else:
        found.append(
            conditions.Condition(
                names.ConditionType.CAPACITY_UNAVAILABLE, "False", "Scheduled", "every runtime pod is placed"
            )
        )

    phase: status_models.Phase
    if progress and progress.get("status") == "False":
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
