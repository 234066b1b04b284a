"""Tables of bad LLMService manifests for tests: each case one mutation of a good manifest and the field
the refusal must name, checked both against the pydantic models and against the real API server.

The bad-manifest tests (tests/operator/cluster/test_bad_manifests_refused.py and
test_model_cache_and_kv_manifests_refused.py) share these, so a case means the same in every table and
the models and the API server are asked the same question the same way.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import subprocess
from collections.abc import Callable
from typing import Any, Protocol

import pydantic
import yaml

from fleetlm_operator.api import models

Manifest = dict[str, Any]
Mutation = Callable[[Manifest], None]


class Kubectl(Protocol):
    """What the cases need of a control plane (fleetlm_dev.cluster.ControlPlane is one)."""

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]: ...


def _walk(manifest: Manifest, path: str) -> tuple[Any, str | int]:
    """The container holding the last element of a dotted path (`spec.qos.classes.0.name`)."""
    *parents, last = path.split(".")
    node: Any = manifest
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    return node, (int(last) if isinstance(node, list) else last)


def set_(path: str, value: Any) -> Mutation:
    def mutate(manifest: Manifest) -> None:
        node, key = _walk(manifest, path)
        node[key] = copy.deepcopy(value)

    return mutate


def delete(path: str) -> Mutation:
    def mutate(manifest: Manifest) -> None:
        node, key = _walk(manifest, path)
        del node[key]

    return mutate


def both(*mutations: Mutation) -> Mutation:
    def mutate(manifest: Manifest) -> None:
        for mutation in mutations:
            mutation(manifest)

    return mutate


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    mutate: Mutation
    field: str  # the field path the refusal must name (k8s spelling: spec.qos.classes[0].name)

    def applied_to(self, good: Callable[..., Manifest]) -> Manifest:
        """`good(name=...)` named after the case, with the case's mutation applied."""
        manifest = good(name=f"bad-{self.id}")
        self.mutate(manifest)
        return manifest


def kubernetes_path(loc: tuple[str | int, ...]) -> str:
    """A pydantic error location in the API server's spelling: spec.qos.classes[0].name."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            path += f".{part}" if path else part
        # function-after[...] and similar are validator names, not fields
    return path


def pydantic_errors(manifest: Manifest) -> str:
    """`path: message` lines for every error pydantic reports, or '' when the manifest is valid."""
    try:
        models.LLMService.model_validate(manifest)
    except pydantic.ValidationError as error:
        return "\n".join(f"{kubernetes_path(tuple(item['loc']))}: {item['msg']}" for item in error.errors())
    return ""


def kubectl_apply(plane: Kubectl, manifest: Manifest, namespace: str) -> subprocess.CompletedProcess[str]:
    """`kubectl apply` of one manifest, its refusal returned rather than raised."""
    return plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest), check=False)
