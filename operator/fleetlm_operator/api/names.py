"""Well-known names of the LLMService API: group, version, kinds, labels, annotations, conditions.

This module decides the strings that the CRD, the builders, the handlers and the tests share, so that a
renamed label or condition breaks a test instead of a running cluster. It holds constants only: it never
imports anything beyond the standard library and the runtime's contract (standard library only itself),
and never computes a name from a spec (child-object names live with the builders).
"""

from __future__ import annotations

import enum
from typing import Final

from fleetlm_runtime import contract

GROUP = "fleetlm.dev"
VERSION = "v1alpha1"
# Final literals, so that the models' `Literal[...]` fields accept them as defaults; GROUP/VERSION written
# out for the same reason (a type checker reads an f-string as any str).
API_VERSION: Final = "fleetlm.dev/v1alpha1"
KIND: Final = "LLMService"
LIST_KIND = "LLMServiceList"
PLURAL = "llmservices"
SINGULAR = "llmservice"
SHORT_NAMES: tuple[str, ...] = ("llms",)
CATEGORIES: tuple[str, ...] = ("fleetlm",)
CRD_NAME = f"{PLURAL}.{GROUP}"

# The LLMService name becomes the Deployment, Service and PodDisruptionBudget name, and a label value.
MAX_NAME_LENGTH = 63

# Standard labels (https://kubernetes.io/docs/concepts/overview/working-with-objects/common-labels/).
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"

# Values of the standard labels on every object the operator creates for an LLMService.
APP_NAME = "fleetlm"
COMPONENT_RUNTIME = "runtime"
PART_OF = "fleetlm"
MANAGED_BY = "fleetlm-operator"

# Our own label: which LLMService an object belongs to (easier to select on than the instance label).
LABEL_LLMSERVICE = f"{GROUP}/llmservice"

# Pod-template annotation: hash of the spec parts that need new pods (model, runtime, caching, key mounts).
# A tuning-only change leaves it, and therefore the pod template, unchanged.
ANNOTATION_CONFIG_HASH = f"{GROUP}/config-hash"
# Annotation on a model-cache fill Job: the fill program's own report (JSON: phase, bytes, reason).
ANNOTATION_CACHE_PROGRESS = f"{GROUP}/cache-progress"
COMPONENT_MODEL_CACHE = "model-cache"
# Annotations on objects the operator writes, for people reading them.
ANNOTATION_GENERATED_BY = f"{GROUP}/generated-by"
# Annotation on the LLMService: the tuner's state (JSON), so a restarted operator resumes where it was.
ANNOTATION_TUNER_STATE = f"{GROUP}/tuner-state"
# Annotation on the LLMService that fleetlm-router writes on each request it serves or holds: the idle
# handler scales to zero from it. Its home is the runtime's contract, which the router imports too.
ANNOTATION_LAST_REQUEST = contract.ANNOTATION_LAST_REQUEST
# kopf's finalizer on LLMServices: the deletion handler runs before the object goes.
FINALIZER = f"{GROUP}/kopf-finalizer"


class ConditionType(enum.StrEnum):
    """Condition types the operator writes into `status.conditions`."""

    READY = "Ready"  # enough ready replicas serve traffic
    PROGRESSING = "Progressing"  # a rollout or scale is under way
    SLO_MET = "SLOMet"  # observed latency at the SLO percentile is within target
    METRICS_AVAILABLE = "MetricsAvailable"  # the last collection had data from every ready pod
    CAPACITY_UNAVAILABLE = "CapacityUnavailable"  # pods cannot be scheduled (e.g. no free GPU)
    MODEL_CACHE_READY = "ModelCacheReady"  # spec.model.cache is filled; runtime pods may start


CONDITION_TYPES: tuple[str, ...] = tuple(member.value for member in ConditionType)
