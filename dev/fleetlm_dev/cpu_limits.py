"""A container's `resources.limits.cpu`, enforced as the kubelet does: a CFS quota on a cgroup per pod.

The kubelet stand-in (`pod_runner`) runs every pod as a process on this one machine. Without a limit, each
runtime takes as much CPU as it can get, so on a 2-core machine three replicas serve little more than one
and scaling out cannot add capacity. With the limit each pod gets its share (say 0.5 cores: a quota of
50 ms per 100 ms period), what one replica serves is bounded by its share, and a new replica adds its share,
as on a cluster whose nodes have the cores.

A quota is a ceiling, not a guarantee: on a machine where other work runs (other test runs, a package
install) a pod would get less than its limit, and what a replica measured in a short probe would not be
what it gets over the next minutes. On a node the kubelet guarantees it: the pods' parent cgroup
(kubepods) gets CPU shares for the node's allocatable CPU, and nothing much runs beside it. Here the pods'
parent gets the highest weight instead (`PARENT_SHARES`), so the pods get up to their quotas first, and
the quotas (a pod's limit times the replicas, a fraction of the cores: `closed_loop.pod_cpu_limit`) leave
the rest of the machine to everything else.

Works with cgroup v1 (the `cpu` controller) and v2 (`cpu.max`) where this process may create cgroups (root
in a container, as CI runs). Where it may not, `CpuLimits.enforced` is False and pods run unlimited; callers
say so. Only for the kubelet stand-in; nothing here is used in production.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import time
import uuid
from collections.abc import Iterator

log = logging.getLogger(__name__)

CGROUP_ROOT = pathlib.Path("/sys/fs/cgroup")
PERIOD_US = 100_000  # the kubelet's CFS period
PARENT_SHARES = 262_144  # cgroup v1's highest cpu.shares (a nice-0 process has 1024)
PARENT_WEIGHT = 10_000  # cgroup v2's highest cpu.weight (the default is 100)


def parse_cpu(quantity: str | int | float) -> float:
    """A Kubernetes CPU quantity ("500m", "1", "0.5", 2) in cores; ValueError naming it when malformed."""
    text = str(quantity).strip()
    try:
        cores = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        raise ValueError(f"resources.limits.cpu: {quantity!r} is not a CPU quantity such as 500m or 1") from None
    if not cores > 0:
        raise ValueError(f"resources.limits.cpu: {quantity!r} must be more than 0")
    return cores


class CpuLimits:
    """One parent cgroup for a runner's pods, one child per pod with its quota."""

    def __init__(self) -> None:
        self._parent: pathlib.Path | None = None
        self._v2 = False
        name = f"fleetlm-pods-{uuid.uuid4().hex[:8]}"
        v1 = CGROUP_ROOT / "cpu"
        try:
            if (v1 / "cpu.cfs_quota_us").is_file():
                (v1 / name).mkdir()
                self._parent = v1 / name
                (self._parent / "cpu.shares").write_text(str(PARENT_SHARES))
            elif "cpu" in (CGROUP_ROOT / "cgroup.controllers").read_text().split():
                with contextlib.suppress(OSError):  # already on, or not ours to turn on (then mkdir tells)
                    (CGROUP_ROOT / "cgroup.subtree_control").write_text("+cpu")
                (CGROUP_ROOT / name).mkdir()
                (CGROUP_ROOT / name / "cgroup.subtree_control").write_text("+cpu")
                self._parent, self._v2 = CGROUP_ROOT / name, True
                (self._parent / "cpu.weight").write_text(str(PARENT_WEIGHT))
        except OSError as error:
            log.warning("CPU limits are not enforced (cannot create a cgroup: %s)", error)
            self._parent = None

    @property
    def enforced(self) -> bool:
        return self._parent is not None

    def group(self, pod: str) -> pathlib.Path:
        """The pod's cgroup directory (its `cpu.stat` counts the periods it was throttled)."""
        if self._parent is None:
            raise RuntimeError("CPU limits are not enforced on this machine")
        return self._parent / pod

    def place(self, pod: str, pid: int, cores: float) -> bool:
        """Put process `pid` (its children follow) under a quota of `cores`; False where not enforced."""
        if self._parent is None:
            return False
        group = self._parent / pod
        quota = max(1000, int(cores * PERIOD_US))
        try:
            group.mkdir(exist_ok=True)
            if self._v2:
                (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
            else:
                (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (group / "cpu.cfs_quota_us").write_text(str(quota))
            (group / "cgroup.procs").write_text(str(pid))
        except OSError as error:
            log.warning("pod %s runs without its CPU limit: %s", pod, error)
            return False
        return True

    def release(self, pod: str) -> None:
        """Remove a pod's cgroup once its processes are gone (a left-over process keeps it; harmless)."""
        if self._parent is not None:
            with contextlib.suppress(OSError):
                (self._parent / pod).rmdir()

    def close(self, *, timeout_s: float = 10.0) -> None:
        """Remove every pod's cgroup and the parent; an engine child that dies with its server may still be
        exiting (and in its cgroup) for a moment after the server was reaped, so this retries a while."""
        if self._parent is None:
            return
        deadline = time.monotonic() + timeout_s
        while True:
            for group in [g for g in self._parent.iterdir() if g.is_dir()]:
                with contextlib.suppress(OSError):
                    group.rmdir()
            with contextlib.suppress(OSError):
                self._parent.rmdir()
            if not self._parent.exists() or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if self._parent.exists():
            log.warning("left cgroup %s behind (processes still in it)", self._parent)
        self._parent = None


@contextlib.contextmanager
def weighted_self(name: str = "fleetlm-harness") -> Iterator[bool]:
    """Run this process (every thread) and the processes it starts meanwhile in a cgroup of the highest
    weight and no quota; yields whether it could. For the end-to-end suite's harness (control plane,
    operators, kubelet stand-in, load generator): on a dedicated machine, as in CI, nothing competes with
    them; on a shared one, work beside them would slow the load generator's clock and inflate the TTFT it
    measures, and slow the control plane and operator the scenarios time. Pods move to their own
    cgroups (`CpuLimits.place`), under their quotas."""
    group: pathlib.Path | None = None
    v1 = CGROUP_ROOT / "cpu"
    root = v1 if (v1 / "cpu.cfs_quota_us").is_file() else CGROUP_ROOT
    try:
        group = root / f"{name}-{uuid.uuid4().hex[:8]}"
        group.mkdir()
        if root == v1:
            (group / "cpu.shares").write_text(str(PARENT_SHARES))
        else:
            (group / "cpu.weight").write_text(str(PARENT_WEIGHT))
        (group / "cgroup.procs").write_text(str(os.getpid()))
    except OSError as error:
        log.warning("the harness runs unweighted (cannot create a cgroup: %s)", error)
        if group is not None:
            with contextlib.suppress(OSError):
                group.rmdir()
        group = None
    try:
        yield group is not None
    finally:
        if group is not None:
            with contextlib.suppress(OSError):
                (root / "cgroup.procs").write_text(str(os.getpid()))
            deadline = time.monotonic() + 10.0
            while group.exists():
                with contextlib.suppress(OSError):
                    group.rmdir()
                if time.monotonic() > deadline:
                    log.warning("left cgroup %s behind (processes still in it)", group)
                    break
                time.sleep(0.2)


def machine_cores() -> int:
    """The cores this process may run on (the affinity mask, not the host's count)."""
    return len(os.sched_getaffinity(0))
