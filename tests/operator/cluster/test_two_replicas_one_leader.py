"""Two `fleetlm-operator` processes: only the Lease holder acts; the standby takes over when it stops.

Runs the real console script, as the Deployment in the Helm chart does, and checks the operator's own
/metrics, its /healthz, and that `--log-format json` writes one JSON object per line.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from fleetlm_dev import cluster
from fleetlm_dev.testing import stop_process, wait_for

pytestmark = pytest.mark.cluster


class OperatorProcess:
    def __init__(self, identity: str, namespace: str, plane: cluster.ControlPlane, workdir: pathlib.Path) -> None:
        self.identity = identity
        self.metrics_port = cluster.free_port()
        self.health_port = cluster.free_port()
        self.log_path = workdir / f"{identity}.log"
        env = {
            **os.environ,
            "KUBECONFIG": str(plane.kubeconfig),
            "FLEETLM_OPERATOR_NAMESPACE": namespace,
            "FLEETLM_OPERATOR_IDENTITY": identity,
            "FLEETLM_METRICS_PORT": str(self.metrics_port),
            "FLEETLM_HEALTH_PORT": str(self.health_port),
            "FLEETLM_LEASE_DURATION_S": "6",
            "FLEETLM_RUNTIME_IMAGE": "registry.invalid/fleetlm/runtime:test",
        }
        script = pathlib.Path(sys.executable).parent / "fleetlm-operator"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(script), "-n", namespace, "--log-format", "json"], env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def http(self, port: int, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
                return int(response.status), response.read().decode()
        except OSError as error:
            return 0, str(error)

    def stop(self) -> int:
        return stop_process(self.proc)


@pytest.fixture
def operators(
    control_plane: cluster.ControlPlane, namespace: str, llmservice_crd: pathlib.Path, tmp_path: pathlib.Path
) -> Iterator[list[OperatorProcess]]:
    started = [OperatorProcess(identity, namespace, control_plane, tmp_path) for identity in ("op-a", "op-b")]
    try:
        yield started
    finally:
        for process in started:
            process.stop()


def _holder(kube: Any) -> str | None:
    lease = kube.get("lease", "fleetlm-operator")
    return (lease or {}).get("spec", {}).get("holderIdentity")


def test_only_the_leader_acts_and_the_standby_takes_over(
    kube: Any, make_example: Any, operators: list[OperatorProcess]
) -> None:
    holder = wait_for("a leader", lambda: _holder(kube))
    leader = next(p for p in operators if p.identity == holder)
    standby = next(p for p in operators if p.identity != holder)

    first = kube.new_name()
    kube.apply(make_example(first))
    kube.wait_get("deployment", first)
    wait_for("the leader's reconcile log", lambda: f"reconciled {kube.namespace}/{first}" in leader.log())
    # The standby may still be starting (imports on a loaded machine take seconds; seen in CI: its log
    # empty when the leader had reconciled): wait for its word, then check it did nothing.
    wait_for("the standby's log", lambda: "standing by" in standby.log())
    assert f"reconciled {kube.namespace}/{first}" not in standby.log()

    _, text = wait_for(
        "the leader's metrics", lambda: (r := leader.http(leader.metrics_port, "/metrics"))[0] == 200 and r
    )
    assert 'fleetlm_operator_reconciles_total{result="ok"}' in text
    assert "fleetlm_operator_leader 1.0" in text
    assert "fleetlm_operator_leader 0.0" in standby.http(standby.metrics_port, "/metrics")[1]
    assert wait_for("the leader's /healthz", lambda: leader.http(leader.health_port, "/healthz")[0] == 200)

    # A clean stop releases the Lease, so the standby takes over at once rather than after expiry.
    assert leader.stop() == 0
    wait_for("the standby to take over", lambda: _holder(kube) == standby.identity, timeout_s=30)
    second = kube.new_name()
    kube.apply(make_example(second))
    kube.wait_get("deployment", second)
    wait_for("the new leader's reconcile", lambda: f"reconciled {kube.namespace}/{second}" in standby.log())

    for process in operators:
        for line in process.log().splitlines():
            if line.strip():
                record = json.loads(line)  # --log-format json: every line is one JSON object
                assert "message" in record
