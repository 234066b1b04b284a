"""Fixtures for operator tests against the real control plane: the CRD, and the operator running
in-process through kopf.testing.KopfRunner exactly as `fleetlm-operator` runs it."""

from __future__ import annotations

import contextlib
import json
import pathlib
import uuid
from collections.abc import Iterator
from typing import Any

import kopf
import pytest
import yaml
from kopf.testing import KopfRunner

from fleetlm_dev import cluster
from fleetlm_dev.testing import wait_for

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
CRD_PATH = REPO_ROOT / "crds" / "llmservices.fleetlm.dev.yaml"


@pytest.fixture(scope="session")
def llmservice_crd(control_plane: cluster.ControlPlane) -> pathlib.Path:
    control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_PATH))
    control_plane.wait_established("crd/llmservices.fleetlm.dev")
    return CRD_PATH


def operator_env(namespace: str, **extra: str) -> dict[str, str]:
    return {
        "FLEETLM_OPERATOR_NAMESPACE": namespace,  # its leader Lease lives there, apart from other tests
        "FLEETLM_METRICS_PORT": "0",
        "FLEETLM_RUNTIME_IMAGE": "registry.invalid/fleetlm/runtime:test",
        **extra,
    }


@contextlib.contextmanager
def running_operator(namespace: str, **env: str) -> Iterator[KopfRunner]:
    """The operator, watching only `namespace`, for the duration of the block; fails on any traceback."""
    settings = kopf.OperatorSettings()
    settings.watching.server_timeout = 10
    settings.execution.default_backoff = 1
    with KopfRunner(
        ["run", "--standalone", "-n", namespace, "-m", "fleetlm_operator.handlers.main"],
        timeout=60,
        settings=settings,
        env=operator_env(namespace, **env),
    ) as runner:
        yield runner
    assert runner.exception is None, runner.output
    assert runner.exit_code == 0, runner.output
    assert "Traceback" not in runner.output, runner.output


@pytest.fixture
def operator(namespace: str, llmservice_crd: pathlib.Path) -> Iterator[KopfRunner]:
    with running_operator(namespace) as runner:
        yield runner


def example(name: str = "tiny-demo", **spec_overrides: Any) -> dict[str, Any]:
    """The CPU demo example with a fresh name and the given top-level spec sections replaced."""
    body = yaml.safe_load((REPO_ROOT / "examples" / "llmservice-cpu-demo.yaml").read_text())
    body["metadata"] = {"name": name}
    body["spec"].update(spec_overrides)
    return body


class Kube:
    """kubectl against the test control plane, in one namespace, returning parsed JSON."""

    def __init__(self, plane: cluster.ControlPlane, namespace: str) -> None:
        self.plane = plane
        self.namespace = namespace

    def apply(self, body: dict[str, Any]) -> None:
        self.plane.kubectl("apply", "-n", self.namespace, "-f", "-", input=json.dumps(body))

    def get(self, *what: str) -> dict[str, Any] | None:
        proc = self.plane.kubectl("get", *what, "-n", self.namespace, "-o", "json", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def wait_get(self, *what: str, timeout_s: float = 60) -> dict[str, Any]:
        return wait_for(f"{' '.join(what)} in {self.namespace}", lambda: self.get(*what), timeout_s=timeout_s)

    def patch(self, *what: str, patch: dict[str, Any]) -> None:
        self.plane.kubectl("patch", *what, "-n", self.namespace, "--type=merge", "-p", json.dumps(patch))

    def items(self, kind: str) -> list[dict[str, Any]]:
        listed = self.get(kind)
        return list(listed["items"]) if listed else []

    def event_reasons(self, name: str, *, kind: str | None = None) -> list[str]:
        """The reasons of the events recorded about object `name` (of `kind`, when given), oldest first."""
        selector = f"involvedObject.name={name}" + (f",involvedObject.kind={kind}" if kind else "")
        events = self.plane.kubectl(
            "get", "events", "-n", self.namespace, "--field-selector", selector, "-o", "jsonpath={.items[*].reason}"
        )
        return events.stdout.split()

    def new_name(self, prefix: str = "svc") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def kube(control_plane: cluster.ControlPlane, namespace: str) -> Kube:
    return Kube(control_plane, namespace)


@pytest.fixture
def make_example() -> Any:
    return example


@pytest.fixture
def operator_factory(namespace: str, llmservice_crd: pathlib.Path) -> Any:
    """`with operator_factory(): ...` runs the operator for a block (to stop and restart it in a test)."""
    return lambda **env: running_operator(namespace, **env)
