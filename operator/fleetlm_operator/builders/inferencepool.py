"""Gateway API Inference Extension objects for an LLMService: an InferencePool and one objective per class.

The InferencePool (`inference.networking.k8s.io/v1`, GIE v1.x) selects the runtime pods on their `http`
port, so any Inference Gateway can pick a pod through its endpoint picker; the pods already export what
that picker reads by default under vLLM's names (`vllm:num_requests_waiting`, ...). The endpoint picker
itself is the gateway's (e.g. llm-d's chart): this module sets no `endpointPickerRef`, and server-side
apply leaves one that the gateway's installer sets under its own field manager alone.

Objectives: GIE's `priority` is "higher is served first; negative is sheddable", FleetLM's is "lower runs
sooner", with sheddability a separate flag. `objective_priorities` maps one onto the other keeping the
order: protected classes get 0 and up (the most urgent class the highest), sheddable classes -1 and
down. A request names its objective in the `x-llm-d-inference-objective` header: `<service>-<class>`.
The objective kind moved from GIE (`inference.networking.x-k8s.io/v1alpha2`) to llm-d
(`llm-d.ai/v1alpha2`) with the same fields; the caller passes whichever the cluster serves.
Whether to create any of these (only where the CRDs exist) is the caller's decision; pure, no I/O.
"""

from __future__ import annotations

from typing import Any

from fleetlm_operator.api import models, spec_models
from fleetlm_operator.builders import meta

POOL_API_VERSION = "inference.networking.k8s.io/v1"
POOL_KIND = "InferencePool"
OBJECTIVE_KIND = "InferenceObjective"
# Newest first: the operator creates objectives of the first one the cluster serves.
OBJECTIVE_API_VERSIONS = ("llm-d.ai/v1alpha2", "inference.networking.x-k8s.io/v1alpha2")
OBJECTIVE_HEADER = "x-llm-d-inference-objective"


def build_inference_pool(svc: models.LLMService) -> dict[str, Any]:
    return {
        "apiVersion": POOL_API_VERSION,
        "kind": POOL_KIND,
        "metadata": meta.object_meta(svc, svc.name),
        "spec": {
            "selector": {"matchLabels": meta.selector_labels(svc)},
            "targetPorts": [{"number": meta.HTTP_PORT}],
            "appProtocol": "http",
        },
    }


def objective_priorities(classes: list[spec_models.QoSClass]) -> dict[str, int]:
    """Class name -> GIE priority: order kept, protected classes >= 0, sheddable classes < 0."""
    protected = sorted({c.priority for c in classes if not c.sheddable})
    sheddable = sorted({c.priority for c in classes if c.sheddable})
    out: dict[str, int] = {}
    for c in classes:
        if c.sheddable:
            out[c.name] = -1 - sheddable.index(c.priority)
        else:
            out[c.name] = len(protected) - 1 - protected.index(c.priority)
    return out


def objective_name(svc: models.LLMService, qos_class: str) -> str:
    return f"{svc.name}-{qos_class}"


def build_objectives(svc: models.LLMService, *, api_version: str) -> list[dict[str, Any]]:
    group = POOL_API_VERSION.split("/", 1)[0]
    return [
        {
            "apiVersion": api_version,
            "kind": OBJECTIVE_KIND,
            "metadata": meta.object_meta(svc, objective_name(svc, name)),
            "spec": {"priority": priority, "poolRef": {"group": group, "kind": POOL_KIND, "name": svc.name}},
        }
        for name, priority in objective_priorities(svc.spec.qos.classes).items()
    ]
