"""`fleetlm-dev bench operator`: how fast the operator brings N LLMService objects to life, and its memory.

Starts a local control plane (or uses `--kubeconfig`), installs the CRD, runs the real `fleetlm-operator`
process, creates N LLMService objects at once, and measures the time until every one has all its
children (Deployment, Service, ConfigMap, Secret, PodDisruptionBudget) and a status; it also reports
the operator's peak resident memory (VmHWM). The bar from the operator issue: 200 objects within 60 s.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import yaml

from fleetlm_dev import cluster, k8s_build, paths, testing

CHILD_KINDS = ("deployments", "services", "configmaps", "secrets", "poddisruptionbudgets")


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _manifest(name: str) -> dict[str, Any]:
    body = yaml.safe_load((paths.repo_root() / "examples" / "llmservice-cpu-demo.yaml").read_text())
    body["metadata"] = {"name": name}
    return dict(body)


def _count_ready(plane: cluster.ControlPlane, namespace: str, names: set[str]) -> tuple[int, int]:
    """(objects with every child, objects with a status written for their generation)."""
    children: dict[str, set[str]] = {}
    for kind in CHILD_KINDS:
        listed = json.loads(plane.kubectl("get", kind, "-n", namespace, "-o", "json").stdout)["items"]
        for item in listed:
            owner = item["metadata"].get("labels", {}).get("fleetlm.dev/llmservice")
            if owner in names:
                children.setdefault(owner, set()).add(kind)
    complete = sum(1 for name in names if children.get(name, set()) == set(CHILD_KINDS))
    services = json.loads(plane.kubectl("get", "llmservices", "-n", namespace, "-o", "json").stdout)["items"]
    with_status = sum(
        1
        for svc in services
        if svc["metadata"]["name"] in names
        and (svc.get("status") or {}).get("observedGeneration") == svc["metadata"]["generation"]
    )
    return complete, with_status


def run(*, plane: cluster.ControlPlane, count: int, timeout_s: float) -> dict[str, Any]:
    namespace = "bench-operator"
    plane.kubectl("create", "namespace", namespace, check=False)
    plane.kubectl("apply", "--server-side", "-f", str(paths.repo_root() / "crds" / "llmservices.fleetlm.dev.yaml"))
    plane.wait_established("crd/llmservices.fleetlm.dev")
    log_path = plane.directory / "logs" / "bench-operator.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "KUBECONFIG": str(plane.kubeconfig),
        "FLEETLM_OPERATOR_NAMESPACE": namespace,
        "FLEETLM_METRICS_PORT": "0",
        "FLEETLM_HEALTH_PORT": "0",
    }
    script = pathlib.Path(sys.executable).parent / "fleetlm-operator"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(script), "-n", namespace, "--log-format", "json"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while plane.kubectl("get", "lease", "fleetlm-operator", "-n", namespace, check=False).returncode != 0:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise cluster.ClusterError(f"the operator did not start; see {log_path}")
            time.sleep(0.5)
        names = {f"bench-{i:04d}" for i in range(count)}
        listing = {"apiVersion": "v1", "kind": "List", "items": [_manifest(name) for name in sorted(names)]}
        started = time.monotonic()
        plane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(listing), timeout=300)
        created_s = time.monotonic() - started
        progress = _progress(count)
        complete = with_status = 0
        while time.monotonic() - started < timeout_s:
            complete, with_status = _count_ready(plane, namespace, names)
            progress(min(complete, with_status))
            if complete == count and with_status == count:
                break
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        return {
            "objects": count,
            "create_seconds": round(created_s, 2),
            "all_children_and_status_seconds": round(elapsed, 2) if complete == with_status == count else None,
            "with_all_children": complete,
            "with_status": with_status,
            "operator_peak_rss_mb": _peak_rss_mb(proc.pid),
            "target_seconds": 60,
        }
    finally:
        testing.stop_process(proc)


def _progress(total: int) -> Any:
    if sys.stderr.isatty():
        import tqdm  # noqa: PLC0415

        bar = tqdm.tqdm(total=total, desc="LLMServices ready", unit="obj")

        def update(done: int) -> None:
            bar.update(done - bar.n)

        return update

    def report(done: int) -> None:
        print(f"[bench] {done}/{total} LLMServices have every child and a status", file=sys.stderr, flush=True)

    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleetlm-dev bench operator", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="LLMService objects created at once")
    parser.add_argument("--timeout", type=float, default=300, help="give up after this many seconds")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    toolset = k8s_build.ensure_built()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="fleetlm-bench-operator-"))
    plane = cluster.ControlPlane(directory=workdir, bin_dir=toolset.bin_dir)
    plane.start()
    try:
        result = run(plane=plane, count=args.count, timeout_s=args.timeout)
    finally:
        plane.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    result["k8s_version"] = plane.k8s_version
    if args.json:
        print(json.dumps(result))
    else:
        total = result["all_children_and_status_seconds"]
        verdict = "PASS" if total is not None and total <= result["target_seconds"] else "FAIL"
        print(f"{result['objects']} LLMService objects created in {result['create_seconds']} s")
        print(f"all children and status after: {total} s (target <= {result['target_seconds']} s)  {verdict}")
        print(f"operator peak RSS: {result['operator_peak_rss_mb']:.0f} MB")
    return 0
