"""Kubernetes-style conditions: merge a freshly computed set into the stored one.

Pure: `now` is a parameter. A condition's lastTransitionTime changes only when its status changes,
as `kubectl wait --for=condition=...` and every Kubernetes controller expect.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True, slots=True)
class Condition:
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str = ""


def _timestamp(now: datetime.datetime) -> str:
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge(existing: Iterable[Mapping[str, Any]], updates: Iterable[Condition], *, now: datetime.datetime,
          observed_generation: int | None) -> list[dict[str, Any]]:
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
            "lastTransitionTime": _timestamp(now) if transitioned or previous is None
            else previous.get("lastTransitionTime", _timestamp(now)),
            "observedGeneration": observed_generation,
        }
    return sorted(merged.values(), key=lambda c: str(c["type"]))


def find(conditions: Iterable[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)
