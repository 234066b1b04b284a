"""`fleetlm-dev cluster up/down` start a working control plane and stop exactly what they started."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from fleetlm_dev import cluster, k8s_build

pytestmark = pytest.mark.cluster


def _fleetlm_dev(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetlm_dev.cli", *args], capture_output=True, text=True, check=False, timeout=300
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_up_writes_a_working_kubeconfig_and_down_stops_only_its_processes(tmp_path: pathlib.Path) -> None:
    k8s_build.ensure_built()
    # A bystander process that `down` must leave alone.
    bystander = subprocess.Popen(["sleep", "300"])
    directory = tmp_path / "cluster"
    try:
        up = _fleetlm_dev("cluster", "up", "--dir", str(directory), "--json")
        assert up.returncode == 0, up.stderr
        info = json.loads(up.stdout)
        plane = cluster.ControlPlane.load(directory)
        assert pathlib.Path(info["kubeconfig"]) == plane.kubeconfig
        namespaces = plane.kubectl("get", "namespaces", "-o", "name").stdout.split()
        assert "namespace/default" in namespaces
        pids = [record.pid for record in plane.processes]
        assert {record.name for record in plane.processes} == set(cluster.START_ORDER)
        assert all(_alive(pid) for pid in pids)

        again = _fleetlm_dev("cluster", "up", "--dir", str(directory))
        assert again.returncode != 0 and "already running" in again.stderr

        status = _fleetlm_dev("cluster", "status", "--dir", str(directory))
        assert status.returncode == 0 and status.stdout.count("running") == 4

        down = _fleetlm_dev("cluster", "down", "--dir", str(directory))
        assert down.returncode == 0, down.stderr
        assert not any(_alive(pid) for pid in pids)
        assert _alive(bystander.pid)
    finally:
        bystander.kill()
        bystander.wait()
        if (directory / cluster.STATE_NAME).exists():
            cluster.down(directory)


def test_down_without_a_running_cluster_says_so(tmp_path: pathlib.Path) -> None:
    result = _fleetlm_dev("cluster", "down", "--dir", str(tmp_path))
    assert result.returncode == 1
    assert "nothing was started there" in result.stderr
