"""OpenAI's `response_format` (and a tool's parameters schema) -> a `Constraint`, checked in the server.

A schema the grammar library cannot turn into a grammar is refused here, as a 400 naming the field, before
the request is admitted. The check is pure Python (the grammar library imports torch, which the server
process never loads): types, keywords' shapes, ranges, regular expressions and local `$ref`s. The engine
compiles each schema once and has the last word: a schema the library still refuses ends that request
alone, with the reason, as `response_format`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fleetlm_runtime.engine import request as request_mod
from fleetlm_runtime.structured import spec

MAX_SCHEMA_CHARS = 64_000  # a guard: conversion time grows with the schema
_LOG_PREFIX = re.compile(r"^\[[^\]]*\] \S+:\d+: ")  # xgrammar's '[time] file.cc:line: ' before a reason


def canonical(schema: Any) -> str:
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def from_response_format(response_format: dict[str, Any] | None) -> spec.Constraint | None:
    """None for no constraint (absent, or `{"type": "text"}`); a 400-worthy error naming the bad field."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return spec.Constraint(kind="json_object")
    if kind != "json_schema":
        raise request_mod.InvalidParameterError(
            "response_format.type", f"must be 'text', 'json_object' or 'json_schema', got {str(kind)[:40]!r}"
        )
    body = response_format.get("json_schema")
    if not isinstance(body, dict):
        raise request_mod.InvalidParameterError(
            "response_format.json_schema", "must be an object with a 'name' and a 'schema'"
        )
    name = body.get("name")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise request_mod.InvalidParameterError(
            "response_format.json_schema.name", "must be a non-empty string of at most 64 characters"
        )
    if "strict" in body and not isinstance(body["strict"], bool | None):
        raise request_mod.InvalidParameterError("response_format.json_schema.strict", "must be a boolean")
    return schema_constraint(body.get("schema", {}), param="response_format.json_schema.schema")


def schema_constraint(schema: Any, *, param: str) -> spec.Constraint:
    """A `json_schema` constraint for `schema`, or an error naming `param` when it is not a usable schema."""
    if not isinstance(schema, dict):
        raise request_mod.InvalidParameterError(param, f"must be a JSON Schema object, got {type(schema).__name__}")
    text = canonical(schema)
    if len(text) > MAX_SCHEMA_CHARS:
        raise request_mod.InvalidParameterError(param, f"the schema exceeds {MAX_SCHEMA_CHARS} characters")
    problem = _convert(text)
    if problem is not None:
        raise request_mod.InvalidParameterError(param, f"not a usable JSON Schema: {problem}")
    return spec.Constraint(kind="json_schema", schema=text)


def for_grammar(text: str) -> str:
    """The schema as the grammar library is given it. xgrammar 0.2.9 compiles a string with `minLength` or
    `maxLength` (and no pattern) to characters that include raw control characters, which JSON forbids; the
    same bounds as a `pattern` compile correctly (a regex over the value, control characters excluded). The
    rewrite narrows what may be generated, never widens it: every output still validates against the user's
    schema, which is what the request carries and the cache keys on."""
    schema = json.loads(text)
    if not _bound_strings(schema):
        return text
    return canonical(schema)


def _bound_strings(node: Any) -> bool:
    changed = False
    if isinstance(node, list):
        for item in node:
            changed = _bound_strings(item) or changed
        return changed
    if not isinstance(node, dict):
        return False
    for value in node.values():
        changed = _bound_strings(value) or changed
    kind = node.get("type")
    is_string = kind == "string" or (isinstance(kind, list) and "string" in kind)
    bounded = "minLength" in node or "maxLength" in node
    free = not any(k in node for k in ("pattern", "format", "enum", "const"))
    low, high = node.get("minLength", 0), node.get("maxLength", "")
    if is_string and bounded and free and isinstance(low, int) and isinstance(high, int | str):
        # Surrogate code points excluded: xgrammar's `.` admits their (invalid) UTF-8 encodings, which decode
        # to three replacement characters each and so break the length bound.
        node["pattern"] = rf"^[^\ud800-\udfff]{{{low},{high}}}$"
        node.pop("minLength", None)  # xgrammar ignores them beside a pattern, with a warning each time
        node.pop("maxLength", None)
        return True
    return changed


_TYPES = frozenset({"object", "array", "string", "integer", "number", "boolean", "null"})
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "not", "contains", "if", "then", "else", "propertyNames")
_COUNTS = (("minLength", "maxLength"), ("minItems", "maxItems"), ("minProperties", "maxProperties"))
_BOUNDS = (("minimum", "maximum"), ("exclusiveMinimum", "exclusiveMaximum"))


def library_reason(error: BaseException) -> str:
    """The grammar library's reason for refusing a schema, without its log prefix."""
    lines = str(error).strip().splitlines()
    return _LOG_PREFIX.sub("", lines[0])[:300] if lines else type(error).__name__


def _convert(text: str) -> str | None:
    """Why `text` is not a schema the engine can compile, or None. Pure Python on purpose: the grammar
    library imports torch, which the server process never loads (the engine child compiles, and refuses
    by name, as `response_format`, the rare schema this check lets through and the library does not take)."""
    root = json.loads(text)
    return _check_node(root, root, "schema", depth=0)


def _check_node(node: Any, root: Any, path: str, *, depth: int) -> str | None:
    if depth > 64:
        return f"{path}: nested too deeply"
    if isinstance(node, bool):
        return None
    if not isinstance(node, dict):
        return f"{path}: a schema must be an object or a boolean, got {type(node).__name__}"
    return (
        _check_types(node, path)
        or _check_subschemas(node, root, path, depth=depth)
        or _check_lists(node, path)
        or _check_numbers(node, path)
        or _check_pattern(node, path)
        or (_check_ref(node["$ref"], root, path) if "$ref" in node else None)
    )


def _check_types(node: dict[str, Any], path: str) -> str | None:
    kind = node.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    for k in kinds:
        if k not in _TYPES:
            return f"{path}.type: unsupported type {str(k)[:40]!r}"
    return None


def _check_subschemas(node: dict[str, Any], root: Any, path: str, *, depth: int) -> str | None:
    """The schemas nested in `node` (properties, anyOf, items, ...), each checked as a node of its own."""
    for key in _SCHEMA_MAPS:
        if key in node:
            if not isinstance(node[key], dict):
                return f"{path}.{key}: must be an object"
            for name, sub in node[key].items():
                if problem := _check_node(sub, root, f"{path}.{key}.{name}", depth=depth + 1):
                    return problem
    for key in _SCHEMA_LISTS:
        if key in node:
            if not isinstance(node[key], list) or not node[key]:
                return f"{path}.{key}: must be a non-empty array of schemas"
            for i, sub in enumerate(node[key]):
                if problem := _check_node(sub, root, f"{path}.{key}[{i}]", depth=depth + 1):
                    return problem
    for key in _SCHEMA_VALUES:
        if key in node and (problem := _check_node(node[key], root, f"{path}.{key}", depth=depth + 1)):
            return problem
    return None


def _check_lists(node: dict[str, Any], path: str) -> str | None:
    """The keywords that hold lists of names or values rather than schemas."""
    if "required" in node and (
        not isinstance(node["required"], list) or not all(isinstance(r, str) for r in node["required"])
    ):
        return f"{path}.required: must be an array of property names"
    if "enum" in node and (not isinstance(node["enum"], list) or not node["enum"]):
        return f"{path}.enum: must be a non-empty array"
    return None


def _check_numbers(node: dict[str, Any], path: str) -> str | None:
    """Counts (minItems, ...) and bounds (minimum, ...): numbers, in order; counts non-negative."""
    for low, high in (*_COUNTS, *_BOUNDS):
        for key in (low, high):
            value = node.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                return f"{path}.{key}: must be a number"
        if (low, high) in _COUNTS and any(isinstance(node.get(k), int | float) and node[k] < 0 for k in (low, high)):
            return f"{path}: {low}/{high} must be non-negative"
        bounded = isinstance(node.get(low), int | float) and isinstance(node.get(high), int | float)
        if bounded and node[low] > node[high]:
            return f"{path}: {low} is greater than {high}"
    if "multipleOf" in node and not (isinstance(node["multipleOf"], int | float) and node["multipleOf"] > 0):
        return f"{path}.multipleOf: must be a number greater than 0"
    return None


def _check_pattern(node: dict[str, Any], path: str) -> str | None:
    if "pattern" not in node:
        return None
    pattern = node["pattern"]
    if not isinstance(pattern, str):
        return f"{path}.pattern: must be a string"
    try:
        re.compile(pattern)
    except re.error as error:
        return f"{path}.pattern: not a regular expression ({error})"
    return None


def _check_ref(ref: Any, root: Any, path: str) -> str | None:
    if not isinstance(ref, str) or not ref.startswith("#"):
        return f"{path}.$ref: only references inside the schema ('#/...') are supported"
    target = root
    for raw in [p for p in ref[1:].split("/") if p]:
        part = raw.replace("~1", "/").replace("~0", "~")
        if not isinstance(target, dict) or part not in target:
            return f"{path}.$ref: {ref[:100]!r} points at nothing in the schema"
        target = target[part]
    return None
