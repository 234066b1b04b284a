"""The spec of an LLMService: what the platform team asks for, every field with its JSON name, its
description (which `kubectl explain` shows), its default and its validation.

Python names are snake_case; JSON names are camelCase through the alias generator. Optional spec
fields are omitted (never null) when unset, so that CEL `has()` means "the user set it". Pure: it never
talks to a cluster.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

import pydantic

from fleetlm_operator.api.cel import Cel, CelRule, cel_extra, is_stored, require
from fleetlm_operator.api.fields import (
    AgingDuration,
    ByteQuantity,
    ClassName,
    Duration,
    IntervalDuration,
    ModelSourceString,
    ObjectName,
    PositiveDuration,
    Quantity,
    camel_config,
    parse_duration_s,
    well_formed,
)
from fleetlm_runtime import contract

# --------------------------------------------------------------------------------------------------
# Base classes.


class _SpecModel(pydantic.BaseModel):
    """Spec parts: camelCase on the wire, unknown fields refused (the API server prunes or refuses them)."""

    model_config = camel_config(extra="forbid")


def _compact(value: Any) -> Any:
    """JSON value without nulls and empty collections: what the CRD stores as a section's default."""
    if isinstance(value, dict):
        pairs = ((key, _compact(item)) for key, item in value.items())
        return {key: item for key, item in pairs if item is not None and item not in ({}, [])}
    if isinstance(value, list):
        return [_compact(item) for item in value]
    return value


def _section(factory: Any, description: str) -> Any:
    """A spec section that is always present.

    The CRD defaults it to the fully defaulted object, not to {}: the API server checks a default
    against the CEL rules before nested defaults apply, so `{}` would fail `self.min <= self.max`.
    """
    default = factory().model_dump(mode="json", by_alias=True, exclude_none=True)
    return pydantic.Field(
        default_factory=factory, description=description, json_schema_extra={"default": _compact(default)}
    )


# --------------------------------------------------------------------------------------------------
# spec.model


Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class HubTokenRef(_SpecModel):
    """A key of a Secret holding a Hugging Face token (for gated or private repositories)."""

    name: ObjectName = pydantic.Field(description="Name of the Secret, in the LLMService's namespace.")
    key: str = pydantic.Field(
        default="token",
        min_length=1,
        max_length=253,
        pattern=r"^[-._a-zA-Z0-9]+$",
        description="Key inside the Secret whose value is the token; the fill Job gets it as HF_TOKEN.",
    )


class ModelCacheFill(_SpecModel):
    """How the cache is filled: a Job runs once, with a deadline and a bounded number of retries."""

    timeout: PositiveDuration = pydantic.Field(
        default="1h",
        description=(
            "Longest the fill may take, all attempts together, e.g. `30m` (the Job's activeDeadlineSeconds). "
            "Past it the cache is Failed with reason DeadlineExceeded."
        ),
    )
    retries: int = pydantic.Field(
        default=3,
        ge=0,
        le=10,
        description=(
            "Attempts after the first one for retryable failures (network, timeouts), with the Job's "
            "exponential back-off (the Job's backoffLimit). A permanent failure (the source does not exist, "
            "or is not a checkpoint) fails at once, without retries."
        ),
    )
    hub_token_secret_ref: HubTokenRef | None = pydantic.Field(
        default=None,
        description="Secret key with a Hugging Face token, passed to the fill as HF_TOKEN; hub sources only.",
    )


class ModelCacheSpec(_SpecModel):
    """A PersistentVolumeClaim filled once with the weights, mounted read-only by every replica."""

    enabled: bool = pydantic.Field(
        default=True, description="Fill and use the cache; false serves straight from `source` again."
    )
    size: ByteQuantity = pydantic.Field(
        description="Storage requested for the claim, e.g. `20Gi`; leave room above the checkpoint's size."
    )
    storage_class_name: ObjectName | None = pydantic.Field(
        default=None, description="StorageClass of the claim; unset uses the cluster's default class."
    )
    access_mode: Literal["ReadWriteMany", "ReadWriteOnce"] = pydantic.Field(
        default="ReadWriteMany",
        description=(
            "Access mode of the claim. The fill Job writes it once and every replica mounts it read-only, so it "
            "must be writable: `ReadWriteMany` (NFS, CephFS, Filestore, EFS...) lets replicas on any node share "
            "it; `ReadWriteOnce` works only while the Job and every replica land on one node. ReadOnlyMany "
            "cannot be filled and ReadWriteOncePod cannot be shared, so neither is offered."
        ),
    )
    when_deleted: Literal["Retain", "Delete"] = pydantic.Field(
        default="Retain",
        description=(
            "What happens to the claim when the LLMService is deleted: `Retain` keeps it (and the weights, for "
            "the next LLMService that names it), `Delete` deletes it with the LLMService."
        ),
    )
    fill: ModelCacheFill = _section(ModelCacheFill, "How the fill Job runs: deadline, retries, hub token.")


MODEL_CACHE_NEEDS_SOURCE = CelRule(
    rule="!has(self.cache) || !self.cache.enabled || !self.source.startsWith('builtin:')",
    message=(
        "spec.model.cache needs weights to copy (a Hugging Face id, pvc://<claim>/<path> or a path): "
        "builtin models are made at start"
    ),
    field_path=".cache",
)


class ModelSpec(_SpecModel):
    """Which model the runtime loads and how."""

    model_config = pydantic.ConfigDict(json_schema_extra=cel_extra(MODEL_CACHE_NEEDS_SOURCE))

    source: ModelSourceString = pydantic.Field(
        description=(
            "Where the weights come from. A Hugging Face id such as `Qwen/Qwen2.5-0.5B-Instruct` (or "
            "`hf://Qwen/Qwen2.5-0.5B-Instruct`; the pod needs network access), `pvc://<claim>/<path>` for "
            "weights on a PersistentVolumeClaim in the same namespace (mounted read-only), an absolute path "
            "baked into the image such as `/models/llama`, or `builtin:tiny` for a small random model made "
            "at start (CPU demos and tests)."
        ),
    )
    revision: str | None = pydantic.Field(
        default=None,
        max_length=128,
        description=(
            "Hugging Face revision (branch, tag or commit) to load. Only used for Hugging Face ids; "
            "unset means the repository's default branch. Pin a commit in production."
        ),
    )
    dtype: Dtype = pydantic.Field(
        default="auto",
        description=(
            "Weight and activation precision. `auto` picks bfloat16 (or float16 where bf16 is unsupported) "
            "on a GPU and float32 on CPU."
        ),
    )
    max_context_length: int | None = pydantic.Field(
        default=None,
        ge=1,
        le=1_048_576,
        description=(
            "Longest prompt plus completion, in tokens, that the runtime accepts; longer prompts are refused "
            "with HTTP 400. Unset means the model's own limit."
        ),
    )
    cache: ModelCacheSpec | None = pydantic.Field(
        default=None,
        description=(
            "Copy the weights once into a PersistentVolumeClaim (a Job downloads or copies them) and mount it "
            "read-only in every replica, so scaling out never downloads again. Runtime pods start only once "
            "status.modelCache.phase is Ready."
        ),
    )

    @pydantic.model_validator(mode="after")
    def _rules(self) -> Self:
        require(
            self.cache is None or not self.cache.enabled or not self.source.startswith("builtin:"),
            MODEL_CACHE_NEEDS_SOURCE,
        )
        return self

    @property
    def cached(self) -> bool:
        """Whether the replicas load from the model cache."""
        return self.cache is not None and self.cache.enabled


# --------------------------------------------------------------------------------------------------
# spec.runtime


class ResourceList(_SpecModel):
    """CPU and memory amounts, as in a container's resources."""

    cpu: Quantity | None = pydantic.Field(default=None, description="CPU cores, e.g. `4` or `500m`.")
    memory: Quantity | None = pydantic.Field(default=None, description="Memory, e.g. `24Gi`.")


class Resources(_SpecModel):
    """CPU and memory requests and limits of each runtime container (GPUs are set by `gpus`)."""

    requests: ResourceList = _section(ResourceList, "Amounts the scheduler reserves for each runtime pod.")
    limits: ResourceList = _section(ResourceList, "Caps on each runtime pod; a pod over its memory limit is killed.")


TOLERATION_EXISTS_NO_VALUE = CelRule(
    rule="self.operator != 'Exists' || !has(self.value) || self.value == ''",
    message="value must be empty when operator is Exists",
    field_path=".value",
)
TOLERATION_EMPTY_KEY_NEEDS_EXISTS = CelRule(
    rule="(has(self.key) && self.key != '') || self.operator == 'Exists'",
    message="operator must be Exists when key is empty",
    field_path=".operator",
)


class Toleration(_SpecModel):
    """A taint the runtime pods tolerate, as in a pod's `tolerations`."""

    model_config = pydantic.ConfigDict(
        json_schema_extra=cel_extra(TOLERATION_EXISTS_NO_VALUE, TOLERATION_EMPTY_KEY_NEEDS_EXISTS)
    )

    key: str | None = pydantic.Field(
        default=None, max_length=316, description="Taint key to match; empty with `Exists` matches every taint."
    )
    operator: Literal["Exists", "Equal"] = pydantic.Field(
        default="Equal", description="`Equal` matches key and value; `Exists` matches the key alone."
    )
    value: str | None = pydantic.Field(default=None, max_length=63, description="Taint value to match (with `Equal`).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = pydantic.Field(
        default=None, description="Taint effect to match; unset matches every effect."
    )
    toleration_seconds: int | None = pydantic.Field(
        default=None,
        ge=0,
        description="With `NoExecute`: how long the pod stays bound after the taint appears; unset is forever.",
    )

    @pydantic.model_validator(mode="after")
    def _rules(self) -> Self:
        require(self.operator != "Exists" or not self.value, TOLERATION_EXISTS_NO_VALUE)
        require(bool(self.key) or self.operator == "Exists", TOLERATION_EMPTY_KEY_NEEDS_EXISTS)
        return self


class KeyRef(_SpecModel):
    """One key of a Secret or ConfigMap in the LLMService's namespace."""

    name: ObjectName = pydantic.Field(description="Name of the Secret or ConfigMap.")
    key: str = pydantic.Field(min_length=1, max_length=253, description="Key inside it.")
    optional: bool | None = pydantic.Field(
        default=None, description="Start the pod even when the object or key is missing."
    )


ENV_SOURCE_EXACTLY_ONE = CelRule(
    rule="has(self.secretKeyRef) != has(self.configMapKeyRef)",
    message="set exactly one of secretKeyRef or configMapKeyRef",
)


class EnvVarSource(_SpecModel):
    """Where an environment variable's value comes from."""

    model_config = pydantic.ConfigDict(json_schema_extra=cel_extra(ENV_SOURCE_EXACTLY_ONE))

    secret_key_ref: KeyRef | None = pydantic.Field(
        default=None, description="A key of a Secret, e.g. a Hugging Face token for gated models."
    )
    config_map_key_ref: KeyRef | None = pydantic.Field(default=None, description="A key of a ConfigMap.")

    @pydantic.model_validator(mode="after")
    def _rules(self) -> Self:
        require((self.secret_key_ref is None) != (self.config_map_key_ref is None), ENV_SOURCE_EXACTLY_ONE)
        return self


ENV_VALUE_XOR_SOURCE = CelRule(
    rule="!(has(self.value) && has(self.valueFrom))",
    message="value and valueFrom are mutually exclusive",
    field_path=".valueFrom",
)


class EnvVar(_SpecModel):
    """An extra environment variable for the runtime container."""

    model_config = pydantic.ConfigDict(json_schema_extra=cel_extra(ENV_VALUE_XOR_SOURCE))

    name: str = pydantic.Field(
        min_length=1,
        max_length=128,
        pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$",
        description="Variable name, e.g. `HF_TOKEN`.",
    )
    value: str | None = pydantic.Field(default=None, max_length=32768, description="Literal value.")
    value_from: EnvVarSource | None = pydantic.Field(
        default=None, description="Read the value from a Secret or ConfigMap key instead."
    )

    @pydantic.model_validator(mode="after")
    def _rules(self) -> Self:
        require(self.value is None or self.value_from is None, ENV_VALUE_XOR_SOURCE)
        return self


ENV_NAMES_UNIQUE = CelRule(
    rule="self.all(e, self.exists_one(f, f.name == e.name))",
    message="spec.runtime.env names must be unique",
)

NodeSelectorValue = Annotated[str, pydantic.StringConstraints(max_length=63)]


class RuntimeSpec(_SpecModel):
    """How each runtime pod runs: image, GPUs, CPU and memory, placement and environment."""

    image: str | None = pydantic.Field(
        default=None,
        min_length=1,
        max_length=512,
        description=(
            "Runtime container image, e.g. `ghcr.io/fleetlm/runtime:0.1.0`. Unset uses the operator's default "
            "runtime image."
        ),
    )
    gpus: int = pydantic.Field(
        default=1,
        ge=0,
        le=16,
        description=(
            "GPUs per replica, requested as `nvidia.com/gpu`. 0 runs on CPU, which only suits "
            "`builtin:tiny` and very small models."
        ),
    )
    resources: Resources = _section(Resources, "CPU and memory requests and limits of each runtime container.")
    node_selector: dict[str, NodeSelectorValue] = pydantic.Field(
        default_factory=dict,
        max_length=32,
        description=("Node labels the runtime pods must match, e.g. `{cloud.google.com/gke-accelerator: nvidia-l4}`."),
    )
    tolerations: list[Toleration] = pydantic.Field(
        default_factory=list,
        max_length=32,
        description=(
            "Taints the runtime pods tolerate. With `gpus > 0` the operator adds a toleration for "
            "`nvidia.com/gpu` unless one is listed."
        ),
    )
    priority_class_name: ObjectName | None = pydantic.Field(
        default=None,
        description="PriorityClass of the runtime pods, so an important service can preempt others for GPUs.",
    )
    env: Annotated[list[EnvVar], Cel((ENV_NAMES_UNIQUE,))] = pydantic.Field(
        default_factory=list,
        max_length=64,
        description="Extra environment variables for the runtime container; they win over the operator's.",
    )

    @pydantic.model_validator(mode="after")
    def _rules(self) -> Self:
        env_names = [variable.name for variable in self.env]
        require(len(env_names) == len(set(env_names)), ENV_NAMES_UNIQUE)
        return self


# --------------------------------------------------------------------------------------------------
# spec.replicas

REPLICAS_MIN_LE_MAX = CelRule(
    rule="self.min <= self.max",
    message="spec.replicas.min must be less than or equal to spec.replicas.max",
    field_path=".min",
)
# Refuses a new or changed `desired` outside [min, max] (kubectl scale, HPA), but lets the user lower
# `max` below a `desired` that someone else wrote: the operator then clamps (see `effective_replicas`).
REPLICAS_DESIRED_IN_RANGE = CelRule(
    rule=(
        "!has(self.desired) || (self.desired >= self.min && self.desired <= self.max) || "
        "(oldSelf.hasValue() && has(oldSelf.value().desired) && oldSelf.value().desired == self.desired)"
    ),
    message="spec.replicas.desired must lie within spec.replicas.min and spec.replicas.max",
    field_path=".desired",
    optional_old_self=True,
)


REPLICAS_IDLE_NEEDS_MIN_0 = CelRule(
    rule="!has(self.idleTimeout) || self.min == 0",
    message="spec.replicas.idleTimeout needs spec.replicas.min 0 (it scales the service to zero)",
    field_path=".idleTimeout",
)


class ReplicasSpec(_SpecModel):
    """How many runtime pods run: bounds for the autoscaler and the count that `/scale` writes."""

    model_config = pydantic.ConfigDict(
        json_schema_extra=cel_extra(REPLICAS_MIN_LE_MAX, REPLICAS_DESIRED_IN_RANGE, REPLICAS_IDLE_NEEDS_MIN_0)
    )

    min: int = pydantic.Field(
        default=1,
        ge=0,
        le=1000,
        description=(
            "Fewest replicas the autoscaler keeps. 0 without `idleTimeout` parks the service (nothing scales it "
            "up from 0); 0 with `idleTimeout` and `spec.router.enabled` is scale to zero: idle for that long, the "
            "service goes to 0, and the router holds the next request while it scales back up."
        ),
    )
    max: int = pydantic.Field(default=1, ge=1, le=1000, description="Most replicas the autoscaler may run. At least 1.")
    desired: int | None = pydantic.Field(
        default=None,
        ge=0,
        le=1000,
        description=(
            "Replica count written through the `/scale` subresource: by `kubectl scale`, by an HPA or KEDA, or "
            "by the operator's own autoscaler. Unset means `min`. Must lie within min..max when written."
        ),
    )
    idle_timeout: PositiveDuration | None = pydantic.Field(
        default=None,
        description=(
            "Scale to zero after this long without a request, e.g. `15m` (needs `min: 0` and "
            "`spec.router.enabled`, whose router holds requests while a replica starts). Unset: never idle down."
        ),
    )

    @pydantic.model_validator(mode="after")
    def _rules(self, info: pydantic.ValidationInfo) -> Self:
        require(self.min <= self.max, REPLICAS_MIN_LE_MAX)
        require(self.idle_timeout is None or self.min == 0, REPLICAS_IDLE_NEEDS_MIN_0)
        if self.desired is not None and not is_stored(info):
            require(self.min <= self.desired <= self.max, REPLICAS_DESIRED_IN_RANGE)
        return self

    @property
    def effective(self) -> int:
        """The replica count to run: `desired` (or `min`) clamped into min..max."""
        wanted = self.min if self.desired is None else self.desired
        return max(self.min, min(self.max, wanted))


# --------------------------------------------------------------------------------------------------
# spec.slo

SLO_NEEDS_TARGET = CelRule(
    rule="has(self.ttft) || has(self.tpot)",
    message="spec.slo must set ttft, tpot or both",
    reason="FieldValueRequired",
)


class SLOSpec(_SpecModel):
    """The latency the service promises, at a percentile over a sliding window."""

    model_config = pydantic.ConfigDict(json_schema_extra=cel_extra(SLO_NEEDS_TARGET))

    ttft: PositiveDuration | None = pydantic.Field(
        default=None,
        description=("Time to first token: from request arrival to the first streamed token, e.g. `500ms` or `2s`."),
    )
    tpot: PositiveDuration | None = pydantic.Field(
        default=None,
        description="Time per output token after the first (inter-token latency), e.g. `50ms`.",
    )
    percentile: float = pydantic.Field(
        default=95.0,
        gt=0,
        lt=100,
        description=(
            "Percentile the targets apply to, strictly between 0 and 100; 95 means 95% of requests must meet "
            "them. 99.9 is allowed."
        ),
    )
    window: PositiveDuration = pydantic.Field(
        default="5m",
        description=(
            "Sliding window over which percentiles and SLO attainment are computed, e.g. `5m`. At least "
            "`spec.autoscaling.interval`."
        ),
    )

    @pydantic.model_validator(mode="after")
    def _rules(self) -> Self:
        require(self.ttft is not None or self.tpot is not None, SLO_NEEDS_TARGET)
        return self


# --------------------------------------------------------------------------------------------------
# spec.qos


class ClassSLO(_SpecModel):
    """Latency targets for one QoS class; unset targets fall back to `spec.slo`."""

    ttft: PositiveDuration | None = pydantic.Field(
        default=None, description="Time-to-first-token target for this class, e.g. `300ms`."
    )
    tpot: PositiveDuration | None = pydantic.Field(
        default=None, description="Time-per-output-token target for this class, e.g. `40ms`."
    )


class QoSClass(_SpecModel):
    """One class of traffic: how it is ordered, shared and shed."""

    name: ClassName = pydantic.Field(
        description=(
            "Class name: lowercase letters, digits and '-', at most 32 characters, such as `critical`, "
            "`standard` or `batch`. It is the `qos_class` label of the runtime's metrics."
        )
    )
    priority: int = pydantic.Field(
        ge=0,
        le=1000,
        description=(
            "Scheduling priority: lower runs sooner (0 is the most urgent). Lower classes are aged, never starved."
        ),
    )
    weight: int = pydantic.Field(
        default=1,
        ge=1,
        le=1000,
        description="Fair-share weight among classes of equal priority; the tuner may adjust it.",
    )
    sheddable: bool = pydantic.Field(
        default=False,
        description=(
            "Whether requests of this class may be refused with HTTP 429 so that higher classes keep their SLO "
            "(at max replicas the tuner sheds sheddable classes first)."
        ),
    )
    queue_limit: int | None = pydantic.Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Most requests of this class that may wait per replica; more are refused with HTTP 429.",
    )
    slo: ClassSLO | None = pydantic.Field(
        default=None, description="Latency targets for this class, overriding `spec.slo` where set."
    )


class SecretKeyRef(_SpecModel):
    """A key of a Secret in the LLMService's namespace."""

    name: ObjectName = pydantic.Field(description="Name of the Secret.")
    key: str = pydantic.Field(
        default="api-keys.yaml",
        min_length=1,
        max_length=253,
        pattern=r"^[-._a-zA-Z0-9]+$",
        description="Key inside the Secret that holds the YAML map of API key to class name.",
    )


QOS_CLASS_NAMES_UNIQUE = CelRule(
    rule="self.all(c, self.exists_one(d, d.name == c.name))",
    message="spec.qos.classes names must be unique",
)
QOS_DEFAULT_CLASS_LISTED = CelRule(
    rule="!has(self.defaultClass) || (has(self.classes) && self.classes.exists(c, c.name == self.defaultClass))",
    message="spec.qos.defaultClass must name one of spec.qos.classes",
    field_path=".defaultClass",
)
QOS_DEFAULT_CLASS_REQUIRED = CelRule(
    rule="!has(self.classes) || size(self.classes) == 0 || has(self.defaultClass)",
    message="spec.qos.defaultClass is required when spec.qos.classes is set",
    field_path=".defaultClass",
    reason="FieldValueRequired",
)
QOS_ONE_CLASS_NOT_SHEDDABLE = CelRule(
    rule="!has(self.classes) || size(self.classes) == 0 || self.classes.exists(c, !c.sheddable)",
    message="spec.qos.classes must include at least one class that is not sheddable",
    field_path=".classes",
)


class QoSSpec(_SpecModel):
    """Classes of traffic and how a request is put into one."""

    model_config = pydantic.ConfigDict(
        json_schema_extra=cel_extra(QOS_DEFAULT_CLASS_LISTED, QOS_DEFAULT_CLASS_REQUIRED, QOS_ONE_CLASS_NOT_SHEDDABLE)
    )

    classes: Annotated[list[QoSClass], Cel((QOS_CLASS_NAMES_UNIQUE,))] = pydantic.Field(
        default_factory=list,
        max_length=16,
        description="QoS classes, at most 16, names unique. Empty means one class for all requests.",
    )
    default_class: ClassName | None = pydantic.Field(
        default=None,
        description="Class of requests that carry no (known) API key; required when `classes` is set.",
    )
    api_keys_secret_ref: SecretKeyRef | None = pydantic.Field(
        default=None,
        description=(
            "Secret whose key holds a YAML map from API key to class name, mounted read-only into the runtime. "
            "A request's class comes from its key, so clients cannot raise their own class."
        ),
    )
    priority_aging: AgingDuration | None = pydantic.Field(
        default=None,
        description=(
            "How long a waiting request takes to gain one priority level, so that a lower class is never "
            "starved (1s to 1h; default 30s, the runtime's). Keep it long beside the TTFT targets and the time a new "
            "replica takes to start: a lower class's backlog aged past a higher class takes its turns. "
            "Read when a pod starts, so a change rolls the pods."
        ),
    )
    allow_header_class: bool = pydantic.Field(
        default=False,
        description=(
            f"Let clients pick their class with the `{contract.HEADER_QOS_CLASS}` header or the "
            f"`{contract.FIELD_QOS_CLASS}` body field, but never a better class than their API key (or, "
            "without a key, the default class) entitles them to: a client may only lower its own class."
        ),
    )

    @pydantic.model_validator(mode="after")
    def _rules(self) -> Self:
        class_names = [qos_class.name for qos_class in self.classes]
        require(len(class_names) == len(set(class_names)), QOS_CLASS_NAMES_UNIQUE)
        require(self.default_class is None or self.default_class in class_names, QOS_DEFAULT_CLASS_LISTED)
        require(not self.classes or self.default_class is not None, QOS_DEFAULT_CLASS_REQUIRED)
        require(
            not self.classes or any(not qos_class.sheddable for qos_class in self.classes),
            QOS_ONE_CLASS_NOT_SHEDDABLE,
        )
        return self


# --------------------------------------------------------------------------------------------------
# spec.batching


class IntRange(_SpecModel):
    """Inclusive bounds within which the tuner may move a limit."""

    min: int = pydantic.Field(default=1, ge=1, le=1_048_576, description="Lowest value the tuner may set.")
    max: int = pydantic.Field(ge=1, le=1_048_576, description="Highest value the tuner may set.")


BATCH_SIZE_RANGE_ORDERED = CelRule(
    rule="self.maxBatchSizeRange.min <= self.maxBatchSizeRange.max",
    message="spec.batching.maxBatchSizeRange.min must be less than or equal to spec.batching.maxBatchSizeRange.max",
    field_path=".maxBatchSizeRange",
)
BATCH_TOKENS_RANGE_ORDERED = CelRule(
    rule="self.maxBatchTokensRange.min <= self.maxBatchTokensRange.max",
    message=(
        "spec.batching.maxBatchTokensRange.min must be less than or equal to spec.batching.maxBatchTokensRange.max"
    ),
    field_path=".maxBatchTokensRange",
)
BATCH_SIZE_IN_RANGE = CelRule(
    rule="self.maxBatchSize >= self.maxBatchSizeRange.min && self.maxBatchSize <= self.maxBatchSizeRange.max",
    message="spec.batching.maxBatchSize must lie within spec.batching.maxBatchSizeRange",
    field_path=".maxBatchSize",
)
BATCH_TOKENS_IN_RANGE = CelRule(
    rule=("self.maxBatchTokens >= self.maxBatchTokensRange.min && self.maxBatchTokens <= self.maxBatchTokensRange.max"),
    message="spec.batching.maxBatchTokens must lie within spec.batching.maxBatchTokensRange",
    field_path=".maxBatchTokens",
)
BATCH_TOKENS_COVER_SIZE = CelRule(
    rule="self.maxBatchTokens >= self.maxBatchSize",
    message=(
        "spec.batching.maxBatchTokens must be at least spec.batching.maxBatchSize "
        "(every running sequence needs one token per step)"
    ),
    field_path=".maxBatchTokens",
)


class BatchingSpec(_SpecModel):
    """Continuous-batching limits: where they start and how far the tuner may move them."""

    model_config = pydantic.ConfigDict(
        json_schema_extra=cel_extra(
            BATCH_SIZE_RANGE_ORDERED,
            BATCH_TOKENS_RANGE_ORDERED,
            BATCH_SIZE_IN_RANGE,
            BATCH_TOKENS_IN_RANGE,
            BATCH_TOKENS_COVER_SIZE,
        )
    )

    max_batch_size: int = pydantic.Field(
        default=32,
        ge=1,
        le=4096,
        description="Initial limit on sequences decoded together in one step (vLLM's max_num_seqs).",
    )
    max_batch_tokens: int = pydantic.Field(
        default=8192,
        ge=1,
        le=1_048_576,
        description=(
            "Initial token budget per step, prefill and decode together (vLLM's max_num_batched_tokens); "
            "longer prompts are prefilled in chunks."
        ),
    )
    max_batch_size_range: IntRange = pydantic.Field(
        default_factory=lambda: IntRange(min=1, max=1024),
        description="Bounds within which the tuner may move `maxBatchSize`.",
        json_schema_extra={"default": {"min": 1, "max": 1024}},
    )
    max_batch_tokens_range: IntRange = pydantic.Field(
        default_factory=lambda: IntRange(min=16, max=131072),
        description="Bounds within which the tuner may move `maxBatchTokens`.",
        json_schema_extra={"default": {"min": 16, "max": 131072}},
    )
    autotune: bool = pydantic.Field(
        default=True,
        description=(
            "Let the operator move the limits within their ranges: shrink them when latency SLOs slip while "
            "the queue is short, grow them when there is headroom and a queue. Changes never restart pods."
        ),
    )

    @pydantic.model_validator(mode="after")
    def _rules(self) -> Self:
        size_range, tokens_range = self.max_batch_size_range, self.max_batch_tokens_range
        require(size_range.min <= size_range.max, BATCH_SIZE_RANGE_ORDERED)
        require(tokens_range.min <= tokens_range.max, BATCH_TOKENS_RANGE_ORDERED)
        require(size_range.min <= self.max_batch_size <= size_range.max, BATCH_SIZE_IN_RANGE)
        require(tokens_range.min <= self.max_batch_tokens <= tokens_range.max, BATCH_TOKENS_IN_RANGE)
        require(self.max_batch_tokens >= self.max_batch_size, BATCH_TOKENS_COVER_SIZE)
        return self


# --------------------------------------------------------------------------------------------------
# spec.caching


class PrefixCacheSpec(_SpecModel):
    """Reuse of KV cache across requests that share a prompt prefix (system prompts, chat history)."""

    enabled: bool = pydantic.Field(default=True, description="Keep and reuse KV cache of shared prefixes.")
    max_tokens: int | None = pydantic.Field(
        default=None,
        ge=1,
        le=100_000_000,
        description="Most prefix tokens kept, evicted least recently used. Unset lets it use the whole KV cache.",
    )


class ResponseCacheSpec(_SpecModel):
    """Serving exact repeats of deterministic requests (temperature 0 or a fixed seed) from memory."""

    enabled: bool = pydantic.Field(default=False, description="Cache responses of deterministic requests.")
    max_entries: int = pydantic.Field(
        default=1024, ge=1, le=1_000_000, description="Most responses kept per replica, evicted least recently used."
    )
    ttl: PositiveDuration = pydantic.Field(
        default="10m", description="How long a cached response may be served, e.g. `10m`."
    )


class CachingSpec(_SpecModel):
    """Prefix (KV) cache and response cache settings. Changing them restarts the pods."""

    prefix_cache: PrefixCacheSpec = _section(PrefixCacheSpec, "Prefix (KV) cache reuse.")
    response_cache: ResponseCacheSpec = _section(ResponseCacheSpec, "Exact-repeat response cache.")


# --------------------------------------------------------------------------------------------------
# spec.kvCache


class KVCacheSpec(_SpecModel):
    """The runtime's KV memory pool: one budget, allocated once at start. Changing it restarts the pods."""

    memory: ByteQuantity | None = pydantic.Field(
        default=None,
        description=(
            "Bytes for the KV pool on any device, e.g. `512Mi` on CPU or `20Gi` on a GPU. Unset: on a GPU the "
            "pool takes what `gpuMemoryUtilization` leaves after the weights; on CPU a default budget."
        ),
    )
    gpu_memory_utilization: float = pydantic.Field(
        default=0.9,
        gt=0,
        le=1,
        description=(
            "On a GPU without `memory`: the fraction of device memory the runtime may use for weights, "
            "activations and the KV pool together (vLLM's gpu_memory_utilization); the pool gets the rest "
            "after weights and activations."
        ),
    )
    block_size: int = pydantic.Field(
        default=16, ge=1, le=256, description="Tokens per KV block: the unit of allocation and prefix sharing."
    )


# --------------------------------------------------------------------------------------------------
# spec.autoscaling

PROMETHEUS_URL_REQUIRED = CelRule(
    rule="self.metricsSource != 'prometheus' || has(self.prometheusUrl)",
    message="spec.autoscaling.prometheusUrl is required when spec.autoscaling.metricsSource is prometheus",
    field_path=".prometheusUrl",
    reason="FieldValueRequired",
)


class AutoscalingSpec(_SpecModel):
    """The operator's tuning loop: where it reads metrics, how often, and how it damps changes."""

    model_config = pydantic.ConfigDict(json_schema_extra=cel_extra(PROMETHEUS_URL_REQUIRED))

    enabled: bool = pydantic.Field(
        default=True,
        description=(
            "Let the operator scale replicas within spec.replicas.min..max. Turn off when an HPA or KEDA drives "
            "the `/scale` subresource instead."
        ),
    )
    mode: Literal["act", "advise"] = pydantic.Field(
        default="act",
        description=(
            "`act` applies the tuner's decisions; `advise` computes and records every decision (status.decisions, "
            "Events, the decisions metric with mode=advise) but applies none: no scaling, no batch-limit or "
            "shedding change. Switching back to `act` applies the current decision at the next tick."
        ),
    )
    metrics_source: Literal["pods", "prometheus"] = pydantic.Field(
        default="pods",
        description="`pods` scrapes each ready pod's /metrics directly; `prometheus` queries `prometheusUrl`.",
    )
    prometheus_url: str | None = pydantic.Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://[^ ]+$",
        description=(
            "Base URL of the Prometheus HTTP API, e.g. `http://prometheus-operated.monitoring.svc:9090`; "
            "required with `metricsSource: prometheus`."
        ),
    )
    interval: IntervalDuration = pydantic.Field(
        default="15s", description="How often the loop collects, decides and acts, e.g. `15s`; at least `1s`."
    )
    scale_up_stabilization: Duration = pydantic.Field(
        default="0s",
        description="How long a higher replica recommendation must hold before scaling up, e.g. `30s`.",
    )
    scale_down_stabilization: Duration = pydantic.Field(
        default="5m",
        description="How long a lower replica recommendation must hold before scaling down one step, e.g. `5m`.",
    )

    @pydantic.model_validator(mode="after")
    def _rules(self) -> Self:
        require(self.metrics_source != "prometheus" or self.prometheus_url is not None, PROMETHEUS_URL_REQUIRED)
        return self


# --------------------------------------------------------------------------------------------------
# spec

SLO_WINDOW_COVERS_INTERVAL = CelRule(
    rule=(
        "!has(self.slo) || !has(self.slo.window) || !has(self.autoscaling) || !has(self.autoscaling.interval) || "
        f"!{well_formed('self.slo.window')} || !{well_formed('self.autoscaling.interval')} || "
        "duration(self.slo.window) >= duration(self.autoscaling.interval)"
    ),
    message="spec.slo.window must be at least spec.autoscaling.interval",
    field_path=".slo.window",
)


# --------------------------------------------------------------------------------------------------
# spec.router

RouterPolicy = Literal["prefix-affinity", "least-loaded", "round-robin"]


class RouterHoldSpec(_SpecModel):
    """Bounds on requests the router holds while no replica is ready (scale from zero, all replicas down)."""

    max_requests: int = pydantic.Field(
        default=256, ge=0, le=100_000, description="Requests held at once; more get 429. 0: never hold (503)."
    )
    timeout: Duration = pydantic.Field(
        default="5m",
        description="Longest a request is held, e.g. `5m`; then 503 with Retry-After. Cover the model's start-up.",
    )


class RouterSpec(_SpecModel):
    """`fleetlm-router` in front of the runtime pods: load- and prefix-aware picks, holding at zero."""

    enabled: bool = pydantic.Field(
        default=False,
        description=(
            "Deploy the router (Deployment, Service `<name>-router`, RBAC) and point `status.endpoint` at it."
        ),
    )
    replicas: int = pydantic.Field(default=1, ge=1, le=100, description="Router pods (each balances on its own).")
    image: str | None = pydantic.Field(
        default=None, max_length=512, description="Router image. Unset: the operator's default router image."
    )
    policy: RouterPolicy = pydantic.Field(
        default="prefix-affinity",
        description=(
            "`prefix-affinity`: consistent hashing with bounded load over the prompt's leading tokens; "
            "`least-loaded`: fewest in flight; `round-robin`: what a Service does."
        ),
    )
    prefix_tokens: int = pydantic.Field(default=256, ge=1, le=65536, description="Leading prompt tokens hashed.")
    load_factor: float = pydantic.Field(
        default=2.0,
        ge=1.0,
        le=10.0,
        description=(
            "A repeated prefix stays on its replica until that one holds this many times the mean in flight; "
            "new prompts always go to the least loaded."
        ),
    )
    hold: RouterHoldSpec = _section(RouterHoldSpec, "How many requests are held, and how long, with no replica.")
    resources: Resources = _section(Resources, "CPU and memory of each router container.")


ROUTER_NEEDED_FOR_IDLE = CelRule(
    rule="!has(self.replicas.idleTimeout) || self.router.enabled",
    message="spec.replicas.idleTimeout needs spec.router.enabled: at zero replicas only the router holds requests",
)


class LLMServiceSpec(_SpecModel):
    """What the platform team asks for: a model, its pods, its latency promise and its traffic classes."""

    model_config = pydantic.ConfigDict(json_schema_extra=cel_extra(SLO_WINDOW_COVERS_INTERVAL, ROUTER_NEEDED_FOR_IDLE))

    model: ModelSpec = pydantic.Field(description="Which model to serve: source, revision, dtype, context length.")
    runtime: RuntimeSpec = _section(
        RuntimeSpec, "How each runtime pod runs: image, GPUs, CPU and memory, node placement, environment."
    )
    replicas: ReplicasSpec = _section(
        ReplicasSpec, "Replica bounds for the autoscaler, and the count that `kubectl scale` and HPAs write."
    )
    slo: SLOSpec | None = pydantic.Field(
        default=None,
        description=(
            "Latency targets (TTFT, TPOT) at a percentile over a window. Unset means no latency promise: the "
            "operator then scales on queue depth alone and leaves SLOMet Unknown."
        ),
    )
    qos: QoSSpec = _section(QoSSpec, "Traffic classes: priorities, weights, shedding and API-key mapping.")
    batching: BatchingSpec = _section(
        BatchingSpec, "Continuous-batching limits and the range the tuner may move them in."
    )
    caching: CachingSpec = _section(CachingSpec, "Prefix cache and response cache.")
    kv_cache: KVCacheSpec = _section(
        KVCacheSpec, "The KV memory pool: bytes, or on a GPU a fraction of memory; block size."
    )
    autoscaling: AutoscalingSpec = _section(
        AutoscalingSpec, "The operator's scaling and tuning loop: metrics source, interval, stabilization."
    )
    router: RouterSpec = _section(
        RouterSpec, "The front door: load- and prefix-aware routing, and holding requests at zero replicas."
    )

    @pydantic.model_validator(mode="after")
    def _rules(self) -> Self:
        require(self.replicas.idle_timeout is None or self.router.enabled, ROUTER_NEEDED_FOR_IDLE)
        if self.slo is not None:
            require(
                parse_duration_s(self.slo.window) >= parse_duration_s(self.autoscaling.interval),
                SLO_WINDOW_COVERS_INTERVAL,
            )
        return self
