"""The generated schema obeys the API server's structural-schema rules and teaches `kubectl explain`.

These are the offline checks; the cluster tests apply the CRD to a real API server, which also
compiles the CEL rules and estimates their cost.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from fleetlm_operator.api import crdgen, models, names, spec_models, status_models

Schema = dict[str, Any]


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return crdgen.render_crd()


@pytest.fixture(scope="module")
def root(crd: dict[str, Any]) -> Schema:
    schema: Schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def walk(schema: Schema, path: str = "") -> Iterator[tuple[str, Schema]]:
    """Every schema node with its path (`.spec.qos.classes[*].name`)."""
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[*]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{*}}")


def node_at(root: Schema, json_path: str) -> Schema:
    node = root
    for part in json_path.strip(".").split("."):
        node = node["properties"][part]
    return node


def test_every_node_has_a_type(root: Schema) -> None:
    for path, node in walk(root):
        assert "type" in node or node.get("x-kubernetes-int-or-string") is True, path


def test_no_refs_or_unions_remain(root: Schema) -> None:
    for path, node in walk(root):
        assert not {"$ref", "$defs", "allOf", "oneOf", "not", "title"} & node.keys(), path
        if "anyOf" in node:  # only the int-or-string form of resource quantities
            assert node.get("x-kubernetes-int-or-string") is True, path
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path


def test_properties_and_additional_properties_are_never_together(root: Schema) -> None:
    for path, node in walk(root):
        assert not ("properties" in node and "additionalProperties" in node), path
        assert not node.get("uniqueItems"), path


def test_no_preserve_unknown_fields(root: Schema) -> None:
    for path, node in walk(root):
        assert "x-kubernetes-preserve-unknown-fields" not in node, path


def test_every_property_has_a_description(root: Schema) -> None:
    missing = [
        path
        for path, node in walk(root)
        if path not in {"", ".metadata"} and not path.endswith(("[*]", "{*}")) and not node.get("description")
    ]
    assert not missing


def test_spec_optionals_are_omitted_and_status_optionals_nullable(root: Schema) -> None:
    for path, node in walk(root["properties"]["spec"], ".spec"):
        assert "nullable" not in node, path  # so a CEL has() means "the user set it"
    status_nullables = [path for path, node in walk(root["properties"]["status"], ".status") if node.get("nullable")]
    assert ".status.observed.ttftSeconds" in status_nullables


def test_lists_and_strings_are_bounded_for_cel_cost(root: Schema) -> None:
    for path, node in walk(root["properties"]["spec"], ".spec"):
        if node.get("type") == "array":
            assert "maxItems" in node, path
        if node.get("type") == "string" and "enum" not in node:
            assert "maxLength" in node, path
        if node.get("type") == "object" and "additionalProperties" in node:
            assert "maxProperties" in node, path


def _matches(value: Any, node: Schema) -> list[str]:
    """A small structural validator, enough to check that every default fits its own schema."""
    kind = node.get("type")
    problems: list[str] = []
    if node.get("x-kubernetes-int-or-string"):
        if not isinstance(value, int | str):
            problems.append(f"{value!r} is neither int nor string")
        return problems
    expected = {
        "object": dict,
        "array": list,
        "string": str,
        "integer": int,
        "number": int | float,
        "boolean": bool,
    }[kind]
    if not isinstance(value, expected) or (kind in {"integer", "number"} and isinstance(value, bool)):
        return [f"{value!r} is not {kind}"]
    if "enum" in node and value not in node["enum"]:
        problems.append(f"{value!r} not in {node['enum']}")
    if "pattern" in node and not re.search(node["pattern"], value):
        problems.append(f"{value!r} does not match {node['pattern']}")
    if "minimum" in node and (value < node["minimum"] or (node.get("exclusiveMinimum") and value == node["minimum"])):
        problems.append(f"{value!r} below minimum")
    if "maximum" in node and (value > node["maximum"] or (node.get("exclusiveMaximum") and value == node["maximum"])):
        problems.append(f"{value!r} above maximum")
    if kind == "object":
        for key in node.get("required", []):
            if key not in value:
                problems.append(f"missing required {key}")
        for key, item in value.items():
            sub = node.get("properties", {}).get(key) or node.get("additionalProperties")
            if not isinstance(sub, dict):
                problems.append(f"unknown field {key}")
            else:
                problems.extend(f"{key}: {problem}" for problem in _matches(item, sub))
    if kind == "array":
        for item in value:
            problems.extend(_matches(item, node["items"]))
    return problems


def test_every_default_validates_against_its_schema(root: Schema) -> None:
    defaults = [(path, node) for path, node in walk(root) if "default" in node]
    assert len(defaults) > 20
    for path, node in defaults:
        assert _matches(node["default"], node) == [], path


def _apply_defaults(value: Any, node: Schema) -> Any:
    """Structural defaulting as the API server does it: fill missing fields that have a default, recursively."""
    if isinstance(value, dict) and node.get("type") == "object":
        result = dict(value)
        for key, sub in node.get("properties", {}).items():
            if key not in result and "default" in sub:
                result[key] = sub["default"]
            if key in result:
                result[key] = _apply_defaults(result[key], sub)
        return result
    if isinstance(value, list) and "items" in node:
        return [_apply_defaults(item, node["items"]) for item in value]
    return value


@pytest.mark.parametrize(
    "spec",
    [
        {"model": {"source": "builtin:tiny"}},
        {
            "model": {"source": "org/model"},
            "slo": {"ttft": "1s"},
            "qos": {"classes": [{"name": "a", "priority": 1}], "defaultClass": "a"},
        },
        {"model": {"source": "/models/x"}, "caching": {"responseCache": {"enabled": True}}, "runtime": {"gpus": 2}},
    ],
)
def test_crd_defaults_equal_model_defaults(root: Schema, spec: dict[str, Any]) -> None:
    defaulted = _apply_defaults(spec, root["properties"]["spec"])
    from_crd = spec_models.LLMServiceSpec.model_validate(defaulted)
    from_models = spec_models.LLMServiceSpec.model_validate(spec)
    assert from_crd == from_models


def test_every_cel_message_comes_from_a_model_rule(root: Schema) -> None:
    known = {(rule.rule, rule.message) for rule in models.OBJECT_RULES}
    found = [(path, entry) for path, node in walk(root) for entry in node.get("x-kubernetes-validations", [])]
    assert len(found) >= 15
    for path, entry in found:
        assert (entry["rule"], entry["message"]) in known, path


def test_cross_field_rules_are_placed_where_their_messages_say(root: Schema) -> None:
    def messages_at(json_path: str) -> set[str]:
        return {entry["message"] for entry in node_at(root, json_path).get("x-kubernetes-validations", [])}

    assert spec_models.REPLICAS_MIN_LE_MAX.message in messages_at(".spec.replicas")
    assert spec_models.REPLICAS_DESIRED_IN_RANGE.message in messages_at(".spec.replicas")
    assert spec_models.QOS_DEFAULT_CLASS_LISTED.message in messages_at(".spec.qos")
    assert spec_models.QOS_CLASS_NAMES_UNIQUE.message in messages_at(".spec.qos.classes")
    assert spec_models.PROMETHEUS_URL_REQUIRED.message in messages_at(".spec.autoscaling")
    assert spec_models.BATCH_SIZE_IN_RANGE.message in messages_at(".spec.batching")
    assert spec_models.SLO_WINDOW_COVERS_INTERVAL.message in messages_at(".spec")
    assert models.NAME_FITS_CHILDREN.message in {entry["message"] for entry in root["x-kubernetes-validations"]}


def test_cel_rules_embed_no_backslashes(root: Schema) -> None:
    # A backslash in a CEL string literal is an escape sequence; none of our regexes need one.
    for path, node in walk(root):
        for entry in node.get("x-kubernetes-validations", []):
            assert "\\" not in entry["rule"], path


def test_resource_names_and_scope(crd: dict[str, Any]) -> None:
    assert crd["metadata"]["name"] == "llmservices.fleetlm.dev"
    spec = crd["spec"]
    assert spec["group"] == names.GROUP
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "LLMService"
    assert spec["names"]["shortNames"] == ["llms"]
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert f"{names.GROUP}/{version['name']}" == names.API_VERSION  # written out in names.py for the type checker


def test_scale_subresource_points_at_integer_fields(crd: dict[str, Any], root: Schema) -> None:
    subresources = crd["spec"]["versions"][0]["subresources"]
    assert subresources["status"] == {}
    scale = subresources["scale"]
    assert scale == {
        "specReplicasPath": ".spec.replicas.desired",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert node_at(root, scale["specReplicasPath"])["type"] == "integer"
    assert node_at(root, scale["statusReplicasPath"])["type"] == "integer"
    assert node_at(root, scale["labelSelectorPath"])["type"] == "string"


def test_printer_columns(crd: dict[str, Any], root: Schema) -> None:
    columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    default_columns = [column["name"] for column in columns if not column.get("priority")]
    assert default_columns == ["Ready", "Replicas", "TTFT", "TTFT-Target", "SLO-Met", "Age"]
    for column in columns:
        path = column["jsonPath"]
        if path.startswith(".status.conditions"):
            assert node_at(root, ".status.conditions")["type"] == "array"
        elif not path.startswith(".metadata"):
            assert node_at(root, path)["type"] == column["type"], path
    by_name = {column["name"]: column for column in columns}
    assert by_name["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    assert by_name["SLO-Met"]["jsonPath"] == '.status.conditions[?(@.type=="SLOMet")].status'


def test_status_conditions_are_a_map_keyed_by_type(root: Schema) -> None:
    conditions = node_at(root, ".status.conditions")
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "type" in conditions["items"]["required"]
    assert conditions["maxItems"] == status_models.MAX_CONDITIONS
    assert node_at(root, ".status.decisions")["maxItems"] == status_models.MAX_DECISIONS


def test_kubectl_explain_teaches_the_slo(root: Schema) -> None:
    slo = node_at(root, ".spec.slo")
    assert "percentile" in slo["description"].lower()
    percentile = slo["properties"]["percentile"]
    assert percentile["default"] == 95
    assert (percentile["minimum"], percentile["exclusiveMinimum"]) == (0, True)
    assert (percentile["maximum"], percentile["exclusiveMaximum"]) == (100, True)
    assert "500ms" in slo["properties"]["ttft"]["description"]
