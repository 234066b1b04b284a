"""Scalar field types of the LLMService spec: durations, quantities, names, model sources, byte sizes.

Each is a pattern (which also goes into the CRD), a pydantic validator that refuses what the pattern
cannot say, and where needed a CEL rule with the same message.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import pydantic
from pydantic import alias_generators

from fleetlm_operator.api.cel import Cel, CelRule
from fleetlm_runtime import config


def camel_config(*, extra: Literal["forbid", "ignore"]) -> pydantic.ConfigDict:
    """The wire form of every part of the resource: camelCase names (Python names accepted too), frozen.
    `extra`: "forbid" for what users write (the spec), "ignore" for what the operator or the API server
    writes (metadata, status), where a newer writer may add fields."""
    return pydantic.ConfigDict(
        alias_generator=alias_generators.to_camel,
        validate_by_alias=True,
        validate_by_name=True,
        serialize_by_alias=True,
        extra=extra,
        frozen=True,
    )


# Go-style durations as users write them: "500ms", "2s", "1m30s", "5m". Bounded so that CEL's
# duration() never overflows and CEL cost estimation stays small; no backslashes, so the same text is
# a valid CEL string literal.
DURATION_PATTERN = "^([0-9]{1,5}([.][0-9]{1,6})?(ms|s|m|h)){1,4}$"
_DURATION_PART = re.compile(r"([0-9]{1,5}(?:[.][0-9]{1,6})?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration_s(text: str) -> float:
    """Seconds in a duration such as "1m30s" (the subset of Go's syntax that DURATION_PATTERN allows)."""
    if re.fullmatch(DURATION_PATTERN, text) is None:
        raise ValueError(f"not a duration: {text!r} (write e.g. 500ms, 2s, 1m30s, 5m)")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _DURATION_PART.findall(text))


def well_formed(expression: str) -> str:
    """CEL: `expression` matches DURATION_PATTERN (so a malformed value gets only the pattern's error)."""
    return f"{expression}.matches('{DURATION_PATTERN}')"


# A well-formed duration is above zero exactly when it has a non-zero digit ("0s", "0.0ms" have none).
POSITIVE_DURATION = CelRule(
    rule=f"!{well_formed('self')} || self.matches('[1-9]')", message="must be a duration above zero"
)
INTERVAL_AT_LEAST_1S = CelRule(
    rule=f"!{well_formed('self')} || duration(self) >= duration('1s')", message="must be at least 1s"
)

# The runtime's qos.priorityAgingS bounds: under 1s every wait outranks the classes; past 1h aging is moot.
AGING_1S_TO_1H = CelRule(
    rule=f"!{well_formed('self')} || (duration(self) >= duration('1s') && duration(self) <= duration('1h'))",
    message="must be from 1s to 1h",
)


def _positive_duration(value: str) -> str:
    if parse_duration_s(value) <= 0:
        raise ValueError(POSITIVE_DURATION.message)
    return value


def _interval_at_least_1s(value: str) -> str:
    if parse_duration_s(value) < 1:
        raise ValueError(INTERVAL_AT_LEAST_1S.message)
    return value


def _aging_1s_to_1h(value: str) -> str:
    if not 1 <= parse_duration_s(value) <= 3600:
        raise ValueError(AGING_1S_TO_1H.message)
    return value


Duration = Annotated[str, pydantic.StringConstraints(pattern=DURATION_PATTERN, max_length=32)]
PositiveDuration = Annotated[Duration, pydantic.AfterValidator(_positive_duration), Cel((POSITIVE_DURATION,))]
IntervalDuration = Annotated[Duration, pydantic.AfterValidator(_interval_at_least_1s), Cel((INTERVAL_AT_LEAST_1S,))]
AgingDuration = Annotated[Duration, pydantic.AfterValidator(_aging_1s_to_1h), Cel((AGING_1S_TO_1H,))]

# Kubernetes resource quantities ("4", 4, "500m", "24Gi"), as controller-gen renders resource.Quantity.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def _check_quantity(value: int | str) -> int | str:
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a resource quantity may not be negative")
    elif re.fullmatch(QUANTITY_PATTERN, value) is None or value.startswith("-"):
        raise ValueError(f"not a resource quantity: {value!r} (write e.g. 4, 500m, 24Gi)")
    return value


Quantity = Annotated[
    int | str,
    pydantic.AfterValidator(_check_quantity),
    pydantic.WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]

# A DNS-1123 label, at most 32 characters: QoS class names (a Prometheus label value in the runtime).
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
ClassName = Annotated[str, pydantic.StringConstraints(pattern=DNS_LABEL_PATTERN, min_length=1, max_length=32)]
# A DNS-1123 subdomain: names of Secrets, ConfigMaps, PriorityClasses.
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
ObjectName = Annotated[str, pydantic.StringConstraints(pattern=DNS_SUBDOMAIN_PATTERN, min_length=1, max_length=253)]

# Where the weights come from. No backslashes, so the same text is a valid CEL string literal.
MODEL_SOURCE_PATTERN = (
    "^(builtin:tiny"
    "|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[-A-Za-z0-9._/@+=:,~]*)?"
    "|/[-A-Za-z0-9._/@+=:,~]+"
    "|(hf://)?[A-Za-z0-9][-A-Za-z0-9._]*(/[A-Za-z0-9][-A-Za-z0-9._]*)?)$"
)
MODEL_SOURCE = CelRule(
    rule=f"self.matches('{MODEL_SOURCE_PATTERN}')",
    message=(
        "spec.model.source must be a Hugging Face id (org/name or hf://org/name), pvc://<claim>/<path>, "
        "an absolute path inside the image, or builtin:tiny"
    ),
)


def _check_model_source(value: str) -> str:
    if re.fullmatch(MODEL_SOURCE_PATTERN, value) is None:
        raise ValueError(MODEL_SOURCE.message)
    return value


ModelSourceString = Annotated[
    str,
    pydantic.StringConstraints(min_length=1, max_length=512),
    pydantic.AfterValidator(_check_model_source),
    Cel((MODEL_SOURCE,)),
]

# The runtime's KV memory and the cache volume are sizes in bytes: the quantities `parse_bytes` reads
# (a whole number, or a number with K, M, G, T, Ki, Mi, Gi, Ti). No backslashes: also a CEL literal.
BYTES_PATTERN = "^[0-9]+([.][0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$"


def _check_bytes(value: int | str) -> int | str:
    try:
        config.parse_bytes(value)
    except ValueError as error:
        raise ValueError(f"{error}; write e.g. 512Mi or 20Gi") from None
    return value


ByteQuantity = Annotated[
    int | str,
    pydantic.AfterValidator(_check_bytes),
    pydantic.WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "minimum": 1,
            "pattern": BYTES_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]
