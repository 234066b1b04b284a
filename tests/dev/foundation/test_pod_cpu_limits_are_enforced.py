"""The kubelet stand-in holds a pod to its `limits.cpu` as the kubelet does (a CFS quota on a cgroup of the
pod's own): a busy process, and the child it starts, get no more than their share together."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import pytest

from fleetlm_dev import cpu_limits

BUSY = "import time\nend = time.time() + {s}\nwhile time.time() < end: pass\n"


@pytest.mark.parametrize(("quantity", "cores"), [("500m", 0.5), ("1", 1.0), ("0.25", 0.25), (2, 2.0), ("1500m", 1.5)])
def test_cpu_quantities(quantity: str | int, cores: float) -> None:
    assert cpu_limits.parse_cpu(quantity) == cores


@pytest.mark.parametrize("quantity", ["", "half", "0", "-1", "m"])
def test_bad_cpu_quantities_name_the_field(quantity: str) -> None:
    with pytest.raises(ValueError, match=r"resources\.limits\.cpu"):
        cpu_limits.parse_cpu(quantity)


def test_a_pod_and_its_child_share_one_quota() -> None:
    limits = cpu_limits.CpuLimits()
    if not limits.enforced:
        pytest.skip("this machine does not let this process create cgroups (not root, or no cpu controller)")
    seconds = 2.0
    # The parent starts a child, then both spin: together they may use 0.2 cores, not 2 x 1.
    # It waits for a line on stdin before it starts the child: placed first, the child is born in the cgroup.
    script = (
        "import subprocess, sys\n"
        "sys.stdin.readline()\n"
        f"child = subprocess.Popen([sys.executable, '-c', {BUSY.format(s=seconds)!r}])\n"
        + BUSY.format(s=seconds)
        + "child.wait()\n"
    )
    try:
        process = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE)
        assert limits.place("pod-a", process.pid, 0.2)
        assert process.stdin is not None
        process.stdin.write(b"go\n")
        process.stdin.close()
        began = time.monotonic()
        _, _, rusage = os.wait4(process.pid, 0)  # its CPU time, with the child's it waited for
        process.returncode = 0
        wall = time.monotonic() - began
        usage = rusage.ru_utime + rusage.ru_stime
        assert usage / wall < 0.3, f"{usage:.2f} CPU-seconds in {wall:.2f}s: over the 0.2-core quota"
        # And the kernel held it there (on a busy machine the share alone could be low without a quota).
        stat = dict(line.split() for line in (limits.group("pod-a") / "cpu.stat").read_text().splitlines())
        assert int(stat["nr_throttled"]) > 0, stat
    finally:
        limits.close()


def test_a_pod_gets_its_quota_beside_busy_processes() -> None:
    """The quota is a ceiling; the pods' parent cgroup's weight makes it what the pod gets, as on a node:
    with twice as many busy processes as cores beside it, a busy pod still gets about its 0.5 cores (an
    unweighted one would get a fair share of cores / (busy + 1), 0.4 on two cores, less on fewer)."""
    limits = cpu_limits.CpuLimits()
    if not limits.enforced:
        pytest.skip("this machine does not let this process create cgroups (not root, or no cpu controller)")
    seconds = 3.0
    busy = [
        subprocess.Popen([sys.executable, "-c", BUSY.format(s=seconds + 1)])
        for _ in range(2 * cpu_limits.machine_cores())
    ]
    try:
        script = "import sys\nsys.stdin.readline()\n" + BUSY.format(s=seconds)
        process = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE)
        assert limits.place("pod-a", process.pid, 0.5)
        assert process.stdin is not None
        process.stdin.write(b"go\n")
        process.stdin.close()
        began = time.monotonic()
        _, _, rusage = os.wait4(process.pid, 0)
        process.returncode = 0
        usage = (rusage.ru_utime + rusage.ru_stime) / (time.monotonic() - began)
        assert usage > 0.45, f"the pod got {usage:.2f} cores of its 0.5 beside {len(busy)} busy processes"
    finally:
        for spinner in busy:
            spinner.kill()
            spinner.wait()
        limits.close()


def test_the_harness_runs_weighted_and_leaves_no_cgroup_behind() -> None:
    """`weighted_self`: this process and what it starts meanwhile run in a cgroup of the highest weight;
    afterwards this process is back where it was and the cgroup is gone."""

    def cpu_group(pid: int | str) -> str:
        lines = pathlib.Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        return next(line.split(":", 2)[2] for line in lines if line.split(":")[1] in ("cpu", "cpu,cpuacct", ""))

    before = cpu_group("self")
    with cpu_limits.weighted_self("fleetlm-harness-test") as weighted:
        if not weighted:
            pytest.skip("this machine does not let this process create cgroups (not root, or no cpu controller)")
        inside = cpu_group("self")
        child = subprocess.run(["cat", "/proc/self/cgroup"], capture_output=True, text=True, check=True).stdout
        assert "fleetlm-harness-test-" in inside
        assert inside in child
    assert cpu_group("self") == before
    roots = (cpu_limits.CGROUP_ROOT, cpu_limits.CGROUP_ROOT / "cpu")
    assert not [group for root in roots for group in root.glob("fleetlm-harness-test-*")]
