"""CEL rules of the LLMService CRD, and the pydantic side of them.

A rule that spans fields is written once as a `CelRule`: `crdgen` puts it into the CRD as an
`x-kubernetes-validations` entry, and a model validator enforces the same rule with the same message
(`require`), so pure code refuses the same manifests the API server refuses.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pydantic
import pydantic_core


@dataclasses.dataclass(frozen=True, slots=True)
class CelRule:
    """One `x-kubernetes-validations` entry. The models' validators raise `message` when it fails."""

    rule: str
    message: str
    field_path: str | None = None  # relative to where the rule sits, e.g. ".min"
    reason: str | None = None  # FieldValueInvalid (default), FieldValueRequired, FieldValueDuplicate, ...
    optional_old_self: bool = False  # a transition rule that also runs on create (oldSelf is optional)

    def to_schema(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"rule": self.rule, "message": self.message}
        if self.field_path is not None:
            entry["fieldPath"] = self.field_path
        if self.reason is not None:
            entry["reason"] = self.reason
        if self.optional_old_self:
            entry["optionalOldSelf"] = True
        return entry


@dataclasses.dataclass(frozen=True, slots=True)
class Cel:
    """Annotation metadata that attaches CEL rules to one field's schema (a scalar or a list)."""

    rules: tuple[CelRule, ...]

    def __get_pydantic_json_schema__(
        self,
        core_schema: pydantic_core.CoreSchema,
        handler: pydantic.GetJsonSchemaHandler,
    ) -> dict[str, Any]:
        schema = dict(handler(core_schema))
        schema["x-kubernetes-validations"] = [
            *schema.get("x-kubernetes-validations", []),
            *(rule.to_schema() for rule in self.rules),
        ]
        return schema


def cel_extra(*rules: CelRule) -> dict[str, Any]:
    """`json_schema_extra` for a model whose schema carries object-level CEL rules."""
    return {"x-kubernetes-validations": [rule.to_schema() for rule in rules]}


class RuleViolation(ValueError):
    """A failed cross-field rule; its text is the CEL rule's message."""


def require(ok: bool, rule: CelRule) -> None:
    if not ok:
        raise RuleViolation(rule.message)


# Validation context key: the object was read back from the API server, which already ran its
# transition rules against the old object. Pure code has no old object, so it skips those rules.
STORED = "stored"


def is_stored(info: pydantic.ValidationInfo) -> bool:
    return bool(info.context and info.context.get(STORED))
