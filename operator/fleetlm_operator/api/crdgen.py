"""Generate the LLMService CustomResourceDefinition from the pydantic models.

This module decides how the models become a structural OpenAPI v3 schema that the API server accepts:
`$ref`s inlined, Optional spec fields omitted rather than nullable (so CEL `has()` means "set"),
Optional status fields nullable, pydantic's JSON-Schema-2020 spellings turned into Kubernetes' ones,
CEL rules and list/string bounds kept so that CEL cost estimation passes. It also decides the
subresources, printer columns and the two files it writes (`crds/` and the Helm chart's copy).

It never talks to a cluster. Run `python -m fleetlm_operator.api.crdgen` to regenerate the files and
`python -m fleetlm_operator.api.crdgen --check` to fail (with a diff) when they are out of date.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import pydantic
import yaml

from fleetlm_operator.api import models, names, spec_models, status_models

CRD_FILE = pathlib.PurePosixPath("crds") / f"{names.CRD_NAME}.yaml"
CHART_CRD_FILE = pathlib.PurePosixPath("helm/fleetlm/templates/crds") / f"{names.CRD_NAME}.yaml"
REGENERATE_COMMAND = "python -m fleetlm_operator.api.crdgen"

SCALE_SPEC_REPLICAS_PATH = ".spec.replicas.desired"
SCALE_STATUS_REPLICAS_PATH = ".status.replicas"
SCALE_LABEL_SELECTOR_PATH = ".status.selector"

# Keys that pydantic emits and a CRD schema does not want.
_DROPPED_KEYS = frozenset({"title", "examples", "$defs", "$schema"})
# Output order of schema keys, so the YAML reads top-down like a hand-written CRD.
_KEY_ORDER = (
    "description",
    "type",
    "format",
    "default",
    "enum",
    "pattern",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "nullable",
    "anyOf",
    "x-kubernetes-int-or-string",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "required",
    "properties",
    "items",
    "additionalProperties",
    "x-kubernetes-validations",
)


class SchemaError(ValueError):
    """The models produced something a structural schema cannot express."""


def _ref_name(ref: str) -> str:
    prefix = "#/$defs/"
    if not ref.startswith(prefix):
        raise SchemaError(f"unexpected $ref {ref!r}")
    return ref[len(prefix) :]


def _ordered(schema: Mapping[str, Any]) -> dict[str, Any]:
    rank = {key: index for index, key in enumerate(_KEY_ORDER)}
    return {key: schema[key] for key in sorted(schema, key=lambda key: (rank.get(key, len(rank)), key))}


def _merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """`overlay` (the use site: description, default, extra rules) on top of `base` (the definition)."""
    merged = dict(base)
    for key, value in overlay.items():
        if key == "x-kubernetes-validations":
            merged[key] = [*merged.get(key, []), *value]
        else:
            merged[key] = value
    return merged


def _structural(node: Mapping[str, Any], defs: Mapping[str, Any], *, nullable_optionals: bool) -> dict[str, Any]:
    """One pydantic JSON-schema node turned into a structural CRD schema node."""
    node = dict(node)

    if "$ref" in node:
        ref = node.pop("$ref")
        return _structural(_merge(defs[_ref_name(ref)], node), defs, nullable_optionals=nullable_optionals)
    if "allOf" in node:
        parts = node.pop("allOf")
        if len(parts) != 1:
            raise SchemaError(f"allOf with {len(parts)} parts is not supported")
        return _structural(_merge(parts[0], node), defs, nullable_optionals=nullable_optionals)

    optional = False
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        branches = [branch for branch in node["anyOf"] if branch != {"type": "null"}]
        optional = len(branches) < len(node["anyOf"])
        if len(branches) != 1:
            raise SchemaError(f"a union other than Optional[X] or int-or-string: {node['anyOf']!r}")
        del node["anyOf"]
        # Keep the use-site keys (description, default) over the branch's.
        return _finish(
            _structural(_merge(branches[0], node), defs, nullable_optionals=nullable_optionals),
            optional=optional,
            nullable_optionals=nullable_optionals,
        )
    return _finish(
        _convert(node, defs, nullable_optionals=nullable_optionals),
        optional=False,
        nullable_optionals=nullable_optionals,
    )


def _finish(schema: dict[str, Any], *, optional: bool, nullable_optionals: bool) -> dict[str, Any]:
    if optional and nullable_optionals:
        schema["nullable"] = True
    return _ordered(schema)


def _convert(node: dict[str, Any], defs: Mapping[str, Any], *, nullable_optionals: bool) -> dict[str, Any]:
    schema: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "default" and value is None:
            continue  # Optional's implicit None: absent is the default
        if key == "const":
            schema["enum"] = [value]
        elif key in {"exclusiveMinimum", "exclusiveMaximum"} and not isinstance(value, bool):
            # JSON Schema 2020 `exclusiveMinimum: 0` is OpenAPI v3.0 `minimum: 0, exclusiveMinimum: true`.
            schema["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            schema[key] = True
        elif key == "properties":
            schema["properties"] = {
                prop: _structural(sub, defs, nullable_optionals=nullable_optionals) for prop, sub in value.items()
            }
        elif key == "items":
            schema["items"] = _structural(value, defs, nullable_optionals=nullable_optionals)
        elif key == "additionalProperties":
            if value is False or value is True:
                continue  # pydantic's extra=forbid/allow; a structural schema prunes unknown fields itself
            schema["additionalProperties"] = _structural(value, defs, nullable_optionals=nullable_optionals)
        elif key == "uniqueItems":
            raise SchemaError("uniqueItems is not allowed in a CRD; use a CEL rule")
        else:
            schema[key] = copy.deepcopy(value)
    _check_structural(schema, node)
    return schema


def _check_structural(schema: Mapping[str, Any], node: Mapping[str, Any]) -> None:
    """Refuse a converted node that the API server would reject as not structural."""
    if "properties" in schema and "additionalProperties" in schema:
        raise SchemaError("properties and additionalProperties together are not structural")
    if "type" not in schema and not schema.get("x-kubernetes-int-or-string"):
        raise SchemaError(f"schema node without a type: {node!r}")


def model_schema(model: type[pydantic.BaseModel], *, nullable_optionals: bool) -> dict[str, Any]:
    """The structural schema of one model (spec or status), with every definition inlined."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    return _structural(raw, defs, nullable_optionals=nullable_optionals)


def openapi_schema() -> dict[str, Any]:
    """The `openAPIV3Schema` of the LLMService CRD."""
    spec = model_schema(spec_models.LLMServiceSpec, nullable_optionals=False)
    status = model_schema(status_models.LLMServiceStatus, nullable_optionals=True)
    return _ordered(
        {
            "description": (
                "LLMService serves one language model behind an OpenAI-compatible API on Kubernetes and keeps "
                "a latency promise: the operator runs the model in runtime pods, watches TTFT and TPOT, and "
                "retunes replicas, batch limits and QoS shedding to meet spec.slo."
            ),
            "type": "object",
            "required": ["spec"],
            "properties": {
                "apiVersion": {
                    "description": f"API version of this object: {names.API_VERSION}.",
                    "type": "string",
                },
                "kind": {"description": f"Kind of this object: {names.KIND}.", "type": "string"},
                "metadata": {"type": "object"},
                "spec": spec,
                "status": status,
            },
            "x-kubernetes-validations": [models.NAME_FITS_CHILDREN.to_schema()],
        }
    )


def _condition_column(name: str, condition: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "string",
        "jsonPath": f'.status.conditions[?(@.type=="{condition}")].status',
        "description": description,
    }


def printer_columns() -> list[dict[str, Any]]:
    return [
        _condition_column("Ready", names.ConditionType.READY, "Whether enough replicas are ready to serve."),
        {
            "name": "Replicas",
            "type": "integer",
            "jsonPath": ".status.replicas",
            "description": "Runtime pods that exist.",
        },
        {
            "name": "TTFT",
            "type": "number",
            "jsonPath": ".status.observed.ttftSeconds",
            "description": "Observed time to first token at spec.slo.percentile, in seconds.",
        },
        {
            "name": "TTFT-Target",
            "type": "string",
            "jsonPath": ".spec.slo.ttft",
            "description": "Time-to-first-token target.",
        },
        _condition_column("SLO-Met", names.ConditionType.SLO_MET, "Whether the latency SLO is met."),
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {
            "name": "Phase",
            "type": "string",
            "jsonPath": ".status.phase",
            "priority": 1,
            "description": "Pending, Progressing, Ready, Degraded or Failed.",
        },
        {
            "name": "Ready-Replicas",
            "type": "integer",
            "jsonPath": ".status.readyReplicas",
            "priority": 1,
            "description": "Runtime pods that are ready.",
        },
        {
            "name": "Min",
            "type": "integer",
            "jsonPath": ".spec.replicas.min",
            "priority": 1,
            "description": "Fewest replicas.",
        },
        {
            "name": "Max",
            "type": "integer",
            "jsonPath": ".spec.replicas.max",
            "priority": 1,
            "description": "Most replicas.",
        },
        {
            "name": "Model",
            "type": "string",
            "jsonPath": ".spec.model.source",
            "priority": 1,
            "description": "Where the weights come from.",
        },
        {
            "name": "Endpoint",
            "type": "string",
            "jsonPath": ".status.endpoint",
            "priority": 1,
            "description": "In-cluster base URL.",
        },
    ]


def render_crd() -> dict[str, Any]:
    """The CustomResourceDefinition as a dict, ready to dump."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": names.CRD_NAME,
            "labels": {names.LABEL_NAME: names.APP_NAME, names.LABEL_PART_OF: names.PART_OF},
            "annotations": {names.ANNOTATION_GENERATED_BY: REGENERATE_COMMAND},
        },
        "spec": {
            "group": names.GROUP,
            "names": {
                "kind": names.KIND,
                "listKind": names.LIST_KIND,
                "plural": names.PLURAL,
                "singular": names.SINGULAR,
                "shortNames": list(names.SHORT_NAMES),
                "categories": list(names.CATEGORIES),
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": names.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": SCALE_SPEC_REPLICAS_PATH,
                            "statusReplicasPath": SCALE_STATUS_REPLICAS_PATH,
                            "labelSelectorPath": SCALE_LABEL_SELECTOR_PATH,
                        },
                    },
                    "additionalPrinterColumns": printer_columns(),
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


class _Dumper(yaml.SafeDumper):
    """Block-style YAML with indented lists, the way kubectl and controller-gen write it."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def dump_yaml(document: Mapping[str, Any]) -> str:
    return yaml.dump(
        dict(document), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120, allow_unicode=True
    )


def _header(comment_lines: Sequence[str]) -> str:
    return "".join(f"# {line}\n" if line else "#\n" for line in comment_lines)


_HEADER_LINES = (
    "Generated from operator/fleetlm_operator/api/models.py. Do not edit by hand.",
    f"Regenerate with `{REGENERATE_COMMAND}`; `{REGENERATE_COMMAND} --check` fails when this file is stale.",
)


def render_files() -> dict[pathlib.PurePosixPath, str]:
    """Repository-relative path -> file text, for both copies of the CRD."""
    crd = render_crd()
    body = dump_yaml(crd)
    if "{{" in body or "}}" in body:
        raise SchemaError("the CRD text contains '{{' or '}}', which Helm would read as a template action")

    chart_crd = copy.deepcopy(crd)
    # Helm must not delete the CRD (and with it every LLMService) on `helm uninstall`.
    chart_crd["metadata"]["annotations"]["helm.sh/resource-policy"] = "keep"
    chart_text = (
        "{{- if .Values.crds.install }}\n"
        + _header((*_HEADER_LINES, "Rendered only when `crds.install` is true."))
        + dump_yaml(chart_crd)
        + "{{- end }}\n"
    )
    return {CRD_FILE: _header(_HEADER_LINES) + body, CHART_CRD_FILE: chart_text}


def default_root() -> pathlib.Path:
    """The source checkout this module lives in, or the working directory for an installed package."""
    checkout = pathlib.Path(__file__).resolve().parents[3]
    if (checkout / "pyproject.toml").is_file() and (checkout / "operator").is_dir():
        return checkout
    return pathlib.Path.cwd()


def write_crds(root: pathlib.Path) -> list[pathlib.Path]:
    """Write both CRD files under `root`; returns the paths written."""
    written: list[pathlib.Path] = []
    for relative, text in render_files().items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def check_crds(root: pathlib.Path) -> list[str]:
    """Unified diffs (committed -> generated) of every CRD file under `root` that is out of date."""
    diffs: list[str] = []
    for relative, text in render_files().items():
        path = root / relative
        committed = path.read_text(encoding="utf-8") if path.is_file() else ""
        if committed != text:
            diffs.append(
                "".join(
                    difflib.unified_diff(
                        committed.splitlines(keepends=True),
                        text.splitlines(keepends=True),
                        fromfile=f"{relative} (committed)",
                        tofile=f"{relative} (generated)",
                    )
                )
                or f"{relative}: missing\n"
            )
    return diffs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=REGENERATE_COMMAND, description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--check", action="store_true", help="exit 1 with a diff when the files are out of date")
    parser.add_argument("--root", type=pathlib.Path, default=None, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    root: pathlib.Path = args.root or default_root()
    if args.check:
        diffs = check_crds(root)
        for diff in diffs:
            sys.stdout.write(diff)
        if diffs:
            sys.stderr.write(f"CRD files are out of date; run `{REGENERATE_COMMAND}`\n")
            return 1
        return 0
    for path in write_crds(root):
        sys.stdout.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
