"""Pydantic models of the LLMService resource: the one source of truth for its schema.

This module is the resource itself (metadata, spec, status) and the reading of a stored object; its
parts live beside it: `cel` (the cross-field rules, shared by the CRD and the validators), `fields`
(scalar types: durations, quantities, names), `spec_models` (what an LLMService may ask for) and
`status_models` (what the operator writes back). `crdgen` makes the CRD from `LLMService`. Nothing here
talks to a cluster or imports kopf, kubernetes or aiohttp.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Self

import pydantic

from fleetlm_operator.api import names
from fleetlm_operator.api.cel import STORED, CelRule, require
from fleetlm_operator.api.fields import (
    AGING_1S_TO_1H,
    INTERVAL_AT_LEAST_1S,
    MODEL_SOURCE,
    POSITIVE_DURATION,
    camel_config,
)
from fleetlm_operator.api.spec_models import (
    BATCH_SIZE_IN_RANGE,
    BATCH_SIZE_RANGE_ORDERED,
    BATCH_TOKENS_COVER_SIZE,
    BATCH_TOKENS_IN_RANGE,
    BATCH_TOKENS_RANGE_ORDERED,
    ENV_NAMES_UNIQUE,
    ENV_SOURCE_EXACTLY_ONE,
    ENV_VALUE_XOR_SOURCE,
    MODEL_CACHE_NEEDS_SOURCE,
    PROMETHEUS_URL_REQUIRED,
    QOS_CLASS_NAMES_UNIQUE,
    QOS_DEFAULT_CLASS_LISTED,
    QOS_DEFAULT_CLASS_REQUIRED,
    QOS_ONE_CLASS_NOT_SHEDDABLE,
    REPLICAS_DESIRED_IN_RANGE,
    REPLICAS_IDLE_NEEDS_MIN_0,
    REPLICAS_MIN_LE_MAX,
    ROUTER_NEEDED_FOR_IDLE,
    SLO_NEEDS_TARGET,
    SLO_WINDOW_COVERS_INTERVAL,
    TOLERATION_EMPTY_KEY_NEEDS_EXISTS,
    TOLERATION_EXISTS_NO_VALUE,
    LLMServiceSpec,
)
from fleetlm_operator.api.status_models import LLMServiceStatus, TuningStatus

# --------------------------------------------------------------------------------------------------
# The resource.

NAME_FITS_CHILDREN = CelRule(
    rule=f"self.metadata.name.size() <= {names.MAX_NAME_LENGTH} && !self.metadata.name.contains('.')",
    message=(
        f"metadata.name must be at most {names.MAX_NAME_LENGTH} characters and contain no dots: it names the "
        "Deployment, Service and PodDisruptionBudget"
    ),
)


class ObjectMeta(pydantic.BaseModel):
    """The parts of metadata the operator reads; everything else is ignored."""

    model_config = camel_config(extra="ignore")

    name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = pydantic.Field(default_factory=dict)
    annotations: dict[str, str] = pydantic.Field(default_factory=dict)


class LLMService(pydantic.BaseModel):
    """LLMService serves one language model behind an OpenAI-compatible API and keeps its latency SLO."""

    model_config = camel_config(extra="forbid")

    api_version: Literal["fleetlm.dev/v1alpha1"] = names.API_VERSION
    kind: Literal["LLMService"] = names.KIND
    metadata: ObjectMeta = pydantic.Field(default_factory=ObjectMeta)
    spec: LLMServiceSpec
    status: LLMServiceStatus | None = None

    @pydantic.model_validator(mode="after")
    def _rules(self) -> Self:
        name = self.metadata.name
        if name is not None:
            require(len(name) <= names.MAX_NAME_LENGTH and "." not in name, NAME_FITS_CHILDREN)
        return self

    @property
    def name(self) -> str:
        if not self.metadata.name:
            raise ValueError("the LLMService has no metadata.name")
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or "default"


# Every cross-field rule, for tests and documentation.
OBJECT_RULES: tuple[CelRule, ...] = (
    NAME_FITS_CHILDREN,
    SLO_WINDOW_COVERS_INTERVAL,
    REPLICAS_MIN_LE_MAX,
    REPLICAS_DESIRED_IN_RANGE,
    REPLICAS_IDLE_NEEDS_MIN_0,
    ROUTER_NEEDED_FOR_IDLE,
    SLO_NEEDS_TARGET,
    QOS_CLASS_NAMES_UNIQUE,
    QOS_DEFAULT_CLASS_LISTED,
    QOS_DEFAULT_CLASS_REQUIRED,
    QOS_ONE_CLASS_NOT_SHEDDABLE,
    BATCH_SIZE_RANGE_ORDERED,
    BATCH_TOKENS_RANGE_ORDERED,
    BATCH_SIZE_IN_RANGE,
    BATCH_TOKENS_IN_RANGE,
    BATCH_TOKENS_COVER_SIZE,
    PROMETHEUS_URL_REQUIRED,
    ENV_NAMES_UNIQUE,
    ENV_VALUE_XOR_SOURCE,
    ENV_SOURCE_EXACTLY_ONE,
    TOLERATION_EXISTS_NO_VALUE,
    TOLERATION_EMPTY_KEY_NEEDS_EXISTS,
    MODEL_SOURCE,
    MODEL_CACHE_NEEDS_SOURCE,
    POSITIVE_DURATION,
    INTERVAL_AT_LEAST_1S,
    AGING_1S_TO_1H,
)


def load_stored(body: Mapping[str, Any]) -> LLMService:
    """Parse an LLMService as the API server stored it.

    The API server already ran the transition rules against the old object (a `desired` that was valid
    when written may now lie outside a lowered `max`); the operator clamps instead of refusing.
    """
    return LLMService.model_validate(dict(body), context={STORED: True})


def initial_tuning(spec: LLMServiceSpec) -> TuningStatus:
    """The tuning a fresh service starts from: the spec's initial limits and weights, nothing shed."""
    return TuningStatus(
        max_batch_size=spec.batching.max_batch_size,
        max_batch_tokens=spec.batching.max_batch_tokens,
        shed_classes=[],
        class_weights={qos_class.name: qos_class.weight for qos_class in spec.qos.classes},
    )
