"""The status of an LLMService: what the operator observed and did, written only by the operator.

The operator renders every status section through these models (`status_json`), and `crdgen` makes
the CRD's status schema from them, so what is written and what is documented are one thing.
"""

from __future__ import annotations

import datetime
from typing import Any, Literal

import pydantic

from fleetlm_operator.api import names
from fleetlm_operator.api.fields import camel_config


class _StatusModel(pydantic.BaseModel):
    """Status parts: written by the operator; unknown fields from a newer operator are ignored."""

    model_config = camel_config(extra="ignore")


Phase = Literal["Pending", "Progressing", "Ready", "Degraded", "Failed"]
MAX_CONDITIONS = 16
# The one bound of status.decisions: the CRD's maxItems and the history the tuner keeps. Ten records span a
# scale-up and its settling at the default interval, and keep status small (a reason is up to 1 KiB).
MAX_DECISIONS = 10
# What a decision did, as status.decisions and the operator's decisions metric name it.
DECISION_ACTIONS = ("scale_up", "scale_down", "batch_grow", "batch_shrink", "shed", "unshed")
ADVISE_PREFIX = "advise:"  # advisory mode: decided and recorded, applied nowhere
_ACTION = "(" + "|".join(DECISION_ACTIONS) + ")"
# No backslashes: also a pattern in the CRD.
DECISION_ACTION_PATTERN = f"^({ADVISE_PREFIX})?{_ACTION}(,{_ACTION})*$"


class Condition(_StatusModel):
    """One observation of the service's state, in the shape of metav1.Condition."""

    type: str = pydantic.Field(
        min_length=1,
        max_length=64,
        description=f"One of {', '.join(names.CONDITION_TYPES)}.",
    )
    status: Literal["True", "False", "Unknown"] = pydantic.Field(description="True, False or Unknown.")
    reason: str = pydantic.Field(default="", max_length=1024, description="One-word CamelCase cause.")
    message: str = pydantic.Field(default="", max_length=32768, description="Human-readable details.")
    last_transition_time: datetime.datetime = pydantic.Field(
        description="When the status last changed between True, False and Unknown."
    )
    observed_generation: int | None = pydantic.Field(
        default=None, ge=0, description="metadata.generation the condition was computed from."
    )


class ObservedMetrics(_StatusModel):
    """What the last collection saw over the SLO window. A metric with no data is absent, never zero."""

    percentile: float | None = pydantic.Field(
        default=None,
        gt=0,
        lt=100,
        description="The percentile ttftSeconds and tpotSeconds are at: spec.slo.percentile when collected.",
    )
    ttft_seconds: float | None = pydantic.Field(
        default=None, ge=0, description="Time to first token at `percentile`, in seconds."
    )
    tpot_seconds: float | None = pydantic.Field(
        default=None, ge=0, description="Time per output token at `percentile`, in seconds."
    )
    request_rate: float | None = pydantic.Field(
        default=None, ge=0, description="Requests finished per second, all replicas together."
    )
    queue_depth: float | None = pydantic.Field(
        default=None, ge=0, description="Requests waiting, all replicas together (mean over the window)."
    )
    gpu_utilization: float | None = pydantic.Field(
        default=None, ge=0, le=1, description="Mean GPU utilization, 0 to 1; absent on CPU."
    )
    slo_attainment: float | None = pydantic.Field(
        default=None, ge=0, le=1, description="Fraction of requests in the window that met every SLO target."
    )
    window_seconds: float | None = pydantic.Field(
        default=None, ge=0, description="Length of the window the numbers cover, in seconds."
    )
    collected_at: datetime.datetime | None = pydantic.Field(
        default=None, description="When the numbers were collected."
    )
    num_pods_sampled: int | None = pydantic.Field(default=None, ge=0, description="Pods whose metrics were read.")
    num_pods_expected: int | None = pydantic.Field(
        default=None, ge=0, description="Ready pods at collection time; fewer sampled means partial data."
    )


class TuningStatus(_StatusModel):
    """Limits the operator currently applies to the runtime pods (without restarting them)."""

    max_batch_size: int | None = pydantic.Field(
        default=None, ge=1, description="Current sequences-per-step limit; absent means spec.batching.maxBatchSize."
    )
    max_batch_tokens: int | None = pydantic.Field(
        default=None, ge=1, description="Current token budget per step; absent means spec.batching.maxBatchTokens."
    )
    shed_classes: list[str] = pydantic.Field(
        default_factory=list, max_length=16, description="Sheddable classes currently refused with HTTP 429."
    )
    class_weights: dict[str, int] = pydantic.Field(
        default_factory=dict,
        max_length=16,
        description="Current fair-share weight per class, where the tuner moved it from spec.qos.classes.",
    )
    queue_limits: dict[str, int] = pydantic.Field(
        default_factory=dict,
        max_length=16,
        description=(
            "Current per-replica queue limit per class, sized by the tuner to about one TTFT target of a full "
            "replica's completions (never above the class's spec.qos.classes[].queueLimit); absent classes use "
            "the spec's."
        ),
    )


class StartupStatus(_StatusModel):
    """How long this service's pods take to start, as the tuner learnt it, and the pods loading now."""

    observed_seconds: float | None = pydantic.Field(
        default=None, ge=0, description="Learnt start-up time (pod creation -> Ready, smoothed), in seconds."
    )
    last_seconds: float | None = pydantic.Field(
        default=None, ge=0, description="Start-up time of the latest pod that became ready, in seconds."
    )
    pods_observed: int | None = pydantic.Field(default=None, ge=0, description="Pods the start-up was learnt from.")
    loading_replicas: int | None = pydantic.Field(
        default=None, ge=0, description="Pods not ready yet that the tuner counts as capacity on its way."
    )
    stuck_replicas: int | None = pydantic.Field(
        default=None,
        ge=0,
        description="Pods loading for more than twice the learnt start-up time, no longer counted as capacity.",
    )


class DecisionRecord(_StatusModel):
    """One thing the tuner did (or, in advisory mode, would have done), and why."""

    time: datetime.datetime = pydantic.Field(description="When the decision was made.")
    action: str = pydantic.Field(
        max_length=128,
        pattern=DECISION_ACTION_PATTERN,
        description=(
            f"What was done: {', '.join(DECISION_ACTIONS)}, comma-separated when several (a tick that changes "
            f"nothing is not recorded); prefixed with `{ADVISE_PREFIX}` in advisory mode "
            "(spec.autoscaling.mode: advise), where nothing was applied."
        ),
    )
    reason: str = pydantic.Field(max_length=1024, description="Why, with the numbers that drove it.")


CachePhase = Literal["Pending", "Filling", "Ready", "Failed"]


class ModelCacheStatus(_StatusModel):
    """Where the model cache stands: the fill Job's progress as its fill program reports it."""

    phase: CachePhase = pydantic.Field(
        description="Pending (claim or Job not started), Filling, Ready (pods may start) or Failed (see reason)."
    )
    claim_name: str | None = pydantic.Field(
        default=None, max_length=253, description="The PersistentVolumeClaim that holds the weights."
    )
    job_name: str | None = pydantic.Field(default=None, max_length=253, description="The Job that fills it.")
    bytes_done: int | None = pydantic.Field(default=None, ge=0, description="Bytes copied or downloaded so far.")
    bytes_total: int | None = pydantic.Field(
        default=None, ge=0, description="Bytes of the whole checkpoint, once the fill knows them."
    )
    reason: str | None = pydantic.Field(
        default=None, max_length=128, description="One-word CamelCase cause of the phase, e.g. SourceNotFound."
    )
    message: str | None = pydantic.Field(default=None, max_length=4096, description="Human-readable details.")


class LLMServiceStatus(_StatusModel):
    """What the operator observed and did. Written only by the operator."""

    phase: Phase | None = pydantic.Field(default=None, description="Pending, Progressing, Ready, Degraded or Failed.")
    replicas: int | None = pydantic.Field(
        default=None, ge=0, description="Runtime pods that exist (read by the /scale subresource)."
    )
    ready_replicas: int | None = pydantic.Field(default=None, ge=0, description="Runtime pods that are ready.")
    selector: str | None = pydantic.Field(
        default=None, max_length=1024, description="Label selector of the runtime pods, for the /scale subresource."
    )
    endpoint: str | None = pydantic.Field(
        default=None, max_length=1024, description="In-cluster base URL of the OpenAI-compatible API."
    )
    observed_generation: int | None = pydantic.Field(
        default=None, ge=0, description="metadata.generation the operator last reconciled."
    )
    conditions: list[Condition] = pydantic.Field(
        default_factory=list,
        max_length=MAX_CONDITIONS,
        description=f"The service's conditions, one per type: {', '.join(names.CONDITION_TYPES)}.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed: ObservedMetrics | None = pydantic.Field(
        default=None, description="Metrics over the SLO window from the last collection."
    )
    tuning: TuningStatus | None = pydantic.Field(default=None, description="Limits currently applied to the pods.")
    startup: StartupStatus | None = pydantic.Field(
        default=None, description="The pods' observed start-up time and those loading now, from the tuner."
    )
    model_cache: ModelCacheStatus | None = pydantic.Field(
        default=None, description="The model cache (spec.model.cache): phase, bytes filled, failure reason."
    )
    decisions: list[DecisionRecord] = pydantic.Field(
        default_factory=list,
        max_length=MAX_DECISIONS,
        description=f"The last {MAX_DECISIONS} decisions of the tuning loop that changed something, oldest first.",
    )


def status_json(part: _StatusModel) -> dict[str, Any]:
    """A status section as the operator writes it: camelCase keys, JSON values, and no field without a
    value (unknown figures stay absent; in a merge patch a left-out field keeps what is stored)."""
    return part.model_dump(mode="json", by_alias=True, exclude_none=True)
