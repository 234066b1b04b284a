"""What the model cache adds to an LLMService's status: the ModelCacheReady condition, and why nothing serves.

Pure: takes the cache's state and the rollout's, returns conditions and a phase. While the cache is
not Ready and no replica serves, the service's Ready condition names the cache as the cause (not a
missing Deployment) and its phase is Pending, or Failed once the fill has failed for good. A replica
that still serves the previous source while a new one fills keeps the service Ready.
"""

from __future__ import annotations

from fleetlm_operator.api import names, status_models
from fleetlm_operator.status import conditions

_READY_REASONS = {"Pending": "ModelCachePending", "Filling": "ModelCacheFilling", "Failed": "ModelCacheFailed"}


def progress_text(cache: status_models.ModelCacheStatus) -> str:
    if cache.bytes_done is not None and cache.bytes_total:
        return f"{cache.bytes_done}/{cache.bytes_total} bytes ({100 * cache.bytes_done // cache.bytes_total}%)"
    return ""


def cache_conditions(cache: status_models.ModelCacheStatus, *, ready_replicas: int) -> list[conditions.Condition]:
    found = [
        conditions.Condition(
            names.ConditionType.MODEL_CACHE_READY,
            "True" if cache.phase == "Ready" else "False",
            cache.reason or cache.phase,
            cache.message or "",
        )
    ]
    if cache.phase != "Ready" and ready_replicas == 0:
        detail = "; ".join(part for part in (cache.message or "", progress_text(cache)) if part)
        found.append(
            conditions.Condition(
                names.ConditionType.READY,
                "False",
                _READY_REASONS[cache.phase],
                f"runtime pods wait for the model cache ({cache.phase}): {detail}".rstrip(": "),
            )
        )
    return found


def phase(
    rollout_phase: status_models.Phase, cache: status_models.ModelCacheStatus, *, ready_replicas: int
) -> status_models.Phase:
    if cache.phase == "Ready" or ready_replicas > 0:
        return rollout_phase if cache.phase != "Failed" else "Degraded"
    return "Failed" if cache.phase == "Failed" else "Pending"
