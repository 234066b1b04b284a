"""Two real `fleetlm-operator` processes across real API-server outages: never two leaders.

Found by hand before the fix: after an outage of 8 to 30 s the Lease's renewTime froze for good while the
operator kept acting as leader (its renewal died on a connection error that is not an ApiException, with
nothing logged); the second operator then took the expired Lease and both tuned the same objects.

Here the kube-apiserver process is stopped and started again (etcd and the rest run on). A short outage
(shorter than the renew deadline) leaves the leader in place, renewing again by itself; a long one makes
it step down before its Lease expires (it exits; its supervisor restarts it as a standby, as a Deployment
would) and exactly one replica leads afterwards. Throughout, both operators' `fleetlm_operator_leader`
gauges are sampled: they are never 1 at the same time. After each outage the leader reconciles a new
LLMService (writes and status updates resume) and the Lease's renewTime moves again.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from fleetlm_dev import cluster, supervise
from fleetlm_dev.testing import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.ControlPlane]:
    """A control plane of this module's own: the test stops and restarts its API server, which the tests
    that share the session's plane must not inherit (a just-restarted API server broke the next ones)."""
    with cluster.running(tmp_path_factory.mktemp("outage-plane")) as plane:
        yield plane


@pytest.fixture(scope="module")
def llmservice_crd(control_plane: cluster.ControlPlane) -> pathlib.Path:
    crd = pathlib.Path(__file__).resolve().parents[3] / "crds" / "llmservices.fleetlm.dev.yaml"
    control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
    control_plane.kubectl("wait", "--for=condition=Established", "crd/llmservices.fleetlm.dev", "--timeout=60s")
    return crd


LEASE_S = 15  # the deadline to step down is 2/3 of it: 10 s
DEADLINE_S = LEASE_S * 2 / 3


class Replica:
    def __init__(self, identity: str, namespace: str, plane: cluster.ControlPlane, workdir: pathlib.Path) -> None:
        self.identity = identity
        self.metrics_port = cluster.free_port()
        env = supervise.console_script_env(
            KUBECONFIG=str(plane.kubeconfig),
            FLEETLM_OPERATOR_NAMESPACE=namespace,
            FLEETLM_OPERATOR_IDENTITY=identity,  # a pod keeps its name across container restarts
            FLEETLM_METRICS_PORT=str(self.metrics_port),
            FLEETLM_HEALTH_PORT="0",
            FLEETLM_LEASE_DURATION_S=str(LEASE_S),
            FLEETLM_RUNTIME_IMAGE="registry.invalid/fleetlm/runtime:test",
        )
        script = pathlib.Path(sys.executable).parent / "fleetlm-operator"
        self.process = supervise.Supervised(
            [str(script), "-n", namespace], env=env, log_path=workdir / f"{identity}.log",
            backoff=supervise.Backoff(initial_s=1.0, max_s=4.0),
        )  # fmt: skip

    def leads(self) -> bool:
        """This replica's own account: its leader gauge (no answer while it restarts: not leading)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=1) as resp:
                return "fleetlm_operator_leader 1.0" in resp.read().decode()
        except OSError:
            return False


class LeaderSampler(threading.Thread):
    """Samples every replica's leader gauge until stopped; records the moments two claimed to lead."""

    def __init__(self, replicas: list[Replica]) -> None:
        super().__init__(daemon=True)
        self.replicas = replicas
        self.samples = 0
        self.overlaps: list[tuple[float, list[str]]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.2):
            leading = [r.identity for r in self.replicas if r.leads()]
            self.samples += 1
            if len(leading) > 1:
                self.overlaps.append((time.monotonic(), leading))

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


@pytest.fixture
def replicas(
    control_plane: cluster.ControlPlane, namespace: str, llmservice_crd: pathlib.Path, tmp_path: pathlib.Path
) -> Iterator[list[Replica]]:
    started = [Replica(identity, namespace, control_plane, tmp_path) for identity in ("op-a", "op-b")]
    try:
        yield started
    finally:
        for replica in started:
            replica.process.stop()
        if control_plane.running().get("kube-apiserver") is False:  # a failure mid-outage: leave it up
            control_plane.start_component("kube-apiserver")


def _lease(kube: Any) -> dict[str, Any]:
    return (kube.get("lease", "fleetlm-operator") or {}).get("spec", {})


def _renewed_after(kube: Any, moment: datetime.datetime) -> str | None:
    spec = _lease(kube)
    renew = spec.get("renewTime")
    if renew and datetime.datetime.fromisoformat(renew.replace("Z", "+00:00")) > moment:
        return str(spec.get("holderIdentity"))
    return None


def _freeze(plane: cluster.ControlPlane, frozen_s: float) -> float:
    """SIGSTOP the API server for `frozen_s` (its connections hang: the requests time out), then SIGCONT;
    a short outage, since stopping and starting it takes longer than the renew deadline on a busy machine."""
    record = next(r for r in plane.processes if r.name == "kube-apiserver")
    began = time.monotonic()
    os.kill(record.pid, signal.SIGSTOP)
    try:
        time.sleep(frozen_s)
    finally:
        os.kill(record.pid, signal.SIGCONT)
    return time.monotonic() - began


def _outage(plane: cluster.ControlPlane, down_s: float) -> float:
    """Stop the API server, keep it down `down_s`, start it again; the measured outage in seconds."""
    began = time.monotonic()
    plane.stop_component("kube-apiserver")
    time.sleep(down_s)
    plane.start_component("kube-apiserver")
    return time.monotonic() - began


def _reconciled_by_leader(kube: Any, make_example: Any, replicas: list[Replica], holder: str) -> None:
    name = kube.new_name()
    kube.apply(make_example(name))
    kube.wait_get("deployment", name, timeout_s=90)
    leader = next(r for r in replicas if r.identity == holder)
    wait_for(
        f"{holder} to reconcile {name}",
        lambda: f"reconciled {kube.namespace}/{name}" in leader.process.log(),
        timeout_s=60,
    )
    wait_for(
        f"the status of {name}",
        lambda: (kube.get("llmservice", name) or {}).get("status", {}).get("phase"),
        timeout_s=60,
    )
    for other in replicas:
        if other.identity != holder:
            assert f"reconciled {kube.namespace}/{name}" not in other.process.log()


def test_renewal_survives_outages_and_leadership_stays_single(
    control_plane: cluster.ControlPlane, kube: Any, make_example: Any, replicas: list[Replica]
) -> None:
    holder = wait_for("a leader", lambda: _lease(kube).get("holderIdentity"), timeout_s=90)
    wait_for("the leader's gauge", lambda: next(r for r in replicas if r.identity == holder).leads(), timeout_s=30)
    sampler = LeaderSampler(replicas)
    sampler.start()
    try:
        _reconciled_by_leader(kube, make_example, replicas, holder)

        # 1. A short outage (a hung API server): the leader keeps the Lease and renews again by itself,
        #    without restarting, its hung requests having timed out and been retried.
        leader = next(r for r in replicas if r.identity == holder)
        short_s = _freeze(control_plane, DEADLINE_S / 2)
        before = datetime.datetime.now(tz=datetime.UTC)
        renewed_by = wait_for(
            "a renewal after the short outage", lambda: _renewed_after(kube, before), timeout_s=LEASE_S + 10
        )
        print(f"short outage {short_s:.1f}s: {renewed_by} renewed; restarts {[r.process.restarts for r in replicas]}")
        assert renewed_by == holder and leader.process.restarts == 0, leader.process.log()[-3000:]
        # Whether the freeze caught a renewal in flight depends on its phase against the 5 s renew period
        # (a freeze long enough to always catch one could also pass the 10 s deadline): not asserted here;
        # the long outage below always hits renewals and asserts on them.
        _reconciled_by_leader(kube, make_example, replicas, str(renewed_by))

        # 2. A long outage, past the renew deadline and the Lease's duration: the leader steps down before
        #    its Lease expires (logged, not silent), then one replica leads again once the API is back.
        holder = str(renewed_by)
        leader = next(r for r in replicas if r.identity == holder)
        restarts_before = leader.process.restarts
        before = datetime.datetime.now(tz=datetime.UTC)
        long_s = _outage(control_plane, LEASE_S + 3)
        assert "stepping down" in leader.process.log(), leader.process.log()[-3000:]
        assert "renewal of lease" in leader.process.log()  # each failed attempt was logged
        assert leader.process.restarts > restarts_before  # it exited; its supervisor brought it back
        back = time.monotonic()
        new_holder = wait_for(
            "a leader after the long outage", lambda: _renewed_after(kube, before), timeout_s=LEASE_S + 60
        )
        wait_for(
            "the new leader's gauge",
            lambda: next(r for r in replicas if r.identity == new_holder).leads(),
            timeout_s=60,
        )
        print(
            f"long outage {long_s:.1f}s: {new_holder} leads {time.monotonic() - back:.1f}s after the API "
            f"returned; restarts {[r.process.restarts for r in replicas]}"
        )
        _reconciled_by_leader(kube, make_example, replicas, new_holder)
        # The Lease keeps moving: renewals did not freeze.
        moment = datetime.datetime.now(tz=datetime.UTC)
        assert wait_for("another renewal", lambda: _renewed_after(kube, moment), timeout_s=LEASE_S) == new_holder
    finally:
        sampler.stop()
    assert sampler.samples > 50
    assert not sampler.overlaps, f"two replicas claimed the Lease at once: {sampler.overlaps[:5]}"
