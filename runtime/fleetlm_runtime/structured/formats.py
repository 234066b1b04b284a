"""OpenAI's `response_format` (and a tool's parameters schema) -> a `Constraint`, checked in the server.

A schema the grammar library cannot turn into a grammar is refused here, as a 400 naming the field, before
the request is admitted: the engine process never sees a schema that would fail to compile. The check
converts the schema to a grammar without a tokenizer (cheap; the tokenizer-specific compile happens once
per schema in the engine) and remembers the schemas it has accepted.
"""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=512)
def _convert(text: str) -> str | None:
    """Why `text` does not convert to a grammar, or None when it does (the same options the engine uses)."""
    import xgrammar  # noqa: PLC0415 - imported on first use: servers without structured requests never load it

    try:
        xgrammar.Grammar.from_json_schema(for_grammar(text), any_whitespace=False, strict_mode=True)
    except Exception as error:  # xgrammar raises RuntimeError/ValueError subclasses with the reason
        lines = str(error).strip().splitlines()
        return _LOG_PREFIX.sub("", lines[0])[:300] if lines else type(error).__name__
    return None
