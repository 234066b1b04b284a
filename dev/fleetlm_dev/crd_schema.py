"""The LLMService CRD's structural schema as a JSON-schema validator, for tests of what the operator writes.

The API server treats an openAPIV3Schema as structural: a field the schema does not declare is pruned
without an error, `nullable` admits null, and `x-kubernetes-*` keys are its own. The validator built here
refuses what the API server would refuse and, unlike it, also what it would silently prune, so a status
key the operator writes under a name the CRD does not declare fails a test instead of vanishing.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import jsonschema
import yaml

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
CRD_PATH = REPO_ROOT / "crds" / "llmservices.fleetlm.dev.yaml"


def openapi_schema(path: pathlib.Path = CRD_PATH) -> dict[str, Any]:
    """The served version's openAPIV3Schema, as generated into crds/."""
    crd = yaml.safe_load(path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v.get("served")]
    return dict(version["schema"]["openAPIV3Schema"])


def to_json_schema(node: Mapping[str, Any]) -> dict[str, Any]:
    """A structural schema node as JSON Schema: nullable as a null type, objects closed.

    Draft 4, whose exclusiveMinimum and exclusiveMaximum are booleans, as in OpenAPI v3.0.
    """
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "default", "description"):
            continue  # the API server's own keywords, or ones that validate nothing
        if key == "properties":
            out[key] = {name: to_json_schema(child) for name, child in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, Mapping):
            out[key] = to_json_schema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [to_json_schema(child) for child in value]
        else:
            out[key] = value
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False  # the API server would prune it: as good as refused
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


def status_validator(path: pathlib.Path = CRD_PATH) -> jsonschema.Draft4Validator:
    """Validates a status (or a merge patch of status: every field is optional there) against the CRD."""
    schema = to_json_schema(openapi_schema(path)["properties"]["status"])
    return jsonschema.Draft4Validator(schema, format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER)


def errors(validator: jsonschema.Draft4Validator, value: Any) -> list[str]:
    """Each violation as `path: message`, empty when `value` is valid."""
    return [
        f"{'.'.join(str(p) for p in error.absolute_path) or '<status>'}: {error.message}"
        for error in validator.iter_errors(value)
    ]
