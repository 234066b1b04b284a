"""Kubernetes-style conditions: merge a freshly computed set into the stored one, and who writes which.

Pure: `now` is a parameter. A condition's lastTransitionTime changes only when its status changes,
as `kubectl wait --for=condition=...` and every Kubernetes controller expect.

One mechanism writes status.conditions: server-side apply on the status subresource, one field manager
per writer (the CRD declares the list a map keyed by `type`). Each writer applies the full set of the
types it owns and nothing else, so the API server merges writers entry by entry: the rollout refresh and
the tuner, racing, never revert each other's newest condition (a merge patch of the whole list read a
moment before could). A writer must always apply all of its types: one it leaves out is removed.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Collection, Iterable, Mapping
from typing import Any

# Field managers of the condition writers (server-side apply), and the types the tuner owns; the rollout
# refresh owns the types it computes from the Deployment and pods (Ready, Progressing, CapacityUnavailable).
ROLLOUT_WRITER = "fleetlm-operator-rollout"
TUNER_WRITER = "fleetlm-operator-tuner"
# "Not known yet" for the tuner's types before its first tick, applied unforced under a manager of its
# own: once the tuner has written a value, a late placeholder conflicts and is dropped, never reverting it.
PLACEHOLDER_WRITER = "fleetlm-operator-placeholder"
TUNER_TYPES: tuple[str, ...] = ("MetricsAvailable", "SLOMet")


@dataclasses.dataclass(frozen=True, slots=True)
class Condition:
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str = ""


def _timestamp(now: datetime.datetime) -> str:
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge(
    existing: Iterable[Mapping[str, Any]],
    updates: Iterable[Condition],
    *,
    now: datetime.datetime,
    observed_generation: int | None,
) -> list[dict[str, Any]]:
    """The stored conditions with `updates` applied; conditions not updated are kept as they were."""
    merged: dict[str, dict[str, Any]] = {str(c["type"]): dict(c) for c in existing if "type" in c}
    for update in updates:
        previous = merged.get(update.type)
        transitioned = previous is None or previous.get("status") != update.status
        merged[update.type] = {
            "type": update.type,
            "status": update.status,
            "reason": update.reason,
            "message": update.message,
            "lastTransitionTime": _timestamp(now)
            if transitioned or previous is None
            else previous.get("lastTransitionTime", _timestamp(now)),
            "observedGeneration": observed_generation,
        }
    return sorted(merged.values(), key=lambda c: str(c["type"]))


def find(conditions: Iterable[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def for_apply(
    existing: Iterable[Mapping[str, Any]],
    updates: Iterable[Condition],
    *,
    owned: Collection[str],
    now: datetime.datetime,
    observed_generation: int | None,
) -> list[dict[str, Any]]:
    """One writer's conditions to server-side apply: `updates` merged over the stored ones, only the types it
    owns (those stored and not updated are re-applied as they were), without null fields."""
    merged = merge(existing, updates, now=now, observed_generation=observed_generation)
    return [{k: v for k, v in c.items() if v is not None} for c in merged if c["type"] in owned]


def differ(existing: Iterable[Mapping[str, Any]], applied: Iterable[Mapping[str, Any]]) -> bool:
    """Whether applying `applied` would change any of the stored conditions of its types."""
    stored = {str(c.get("type")): {k: v for k, v in c.items() if v is not None} for c in existing}
    return any(stored.get(str(c["type"])) != dict(c) for c in applied)
