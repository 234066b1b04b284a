"""`fleetlm-dev gpu-check --device cpu` as CI runs it (the console script, default CPU sizes): every check
gives its verdict, NVML is reported as not available rather than failed, and the run exits 0; with a bar
no engine can meet (`--min-speedup`), the throughput check fails and the command exits 1.

On two shared CPU cores the engine and HF's static batch are level (about 1.0x at 32 and 128 streams) and
one sample swings either side of the GPU's bar of 1.0x, so CI judges the CPU run against 0.25x: the check
runs and is judged, and a real regression (a preempting pool, a serial path) still fails it. The 1.0x bar
is asserted where it means something, on a GPU (`fleetlm-dev gpu-check`, default bar)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from fleetlm_dev import checkpoints, gpu_check

REPO = pathlib.Path(__file__).resolve().parents[3]
CPU_MIN_SPEEDUP = 0.25
CHECKS = {"throughput", "peak memory", "greedy equality fp32", "greedy equality bf16", "NVML metrics"}


def _gpu_check(model: pathlib.Path, *args: str) -> tuple[int, dict, str]:
    paths = [str(REPO / d) for d in ("operator", "runtime", "dev", "router")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])}
    script = pathlib.Path(sys.executable).with_name("fleetlm-dev")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fleetlm_dev.cli"]
    command += ["gpu-check", "--device", "cpu", "--json", "--model", str(model), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=env, check=False)
    report = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {}
    return done.returncode, report, done.stderr[-3000:]


@pytest.mark.slow
def test_the_cpu_run_passes_with_every_verdict(real_checkpoint: checkpoints.Checkpoint) -> None:
    code, report, stderr = _gpu_check(real_checkpoint.single, "--min-speedup", str(CPU_MIN_SPEEDUP))
    assert code == 0, [(c["name"], c["summary"]) for c in report.get("checks", []) if c["ok"] is False] or stderr
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) == CHECKS and report["passed"]
    cpu = gpu_check.SIZES["cpu"]
    fp32 = checks["greedy equality fp32"]["details"]
    assert checks["greedy equality fp32"]["ok"] is True and fp32["exact"] == fp32["streams"] == cpu.conversations
    assert checks["greedy equality bf16"]["ok"] is True
    rows = checks["throughput"]["details"]["rows"]
    assert checks["throughput"]["ok"] is True and [r["streams"] for r in rows] == [1, 32, 128]
    assert all(r["ratio"] >= CPU_MIN_SPEEDUP for r in rows if r["streams"] >= 32), rows
    memory = checks["peak memory"]
    assert memory["ok"] is True and memory["details"]["peak_bytes"] <= memory["details"]["bound_bytes"]
    assert memory["details"]["peak_bytes"] >= real_checkpoint.weight_bytes  # the load is in the peak
    nvml = checks["NVML metrics"]
    assert nvml["ok"] is None and nvml["details"]["nvml_available"] is False  # not available: n/a, no failure


@pytest.mark.slow
def test_a_failed_check_fails_the_run(real_checkpoint: checkpoints.Checkpoint) -> None:
    small = ["--streams", "32", "--conversations", "1", "--max-tokens", "2", "--throughput-tokens", "2"]
    code, report, stderr = _gpu_check(real_checkpoint.single, *small, "--min-speedup", "1000")
    assert code == 1, stderr
    checks = {c["name"]: c for c in report["checks"]}
    assert not report["passed"] and checks["throughput"]["ok"] is False
    assert "bar: >= 1000x" in checks["throughput"]["summary"]
    assert all(c["ok"] is not False for name, c in checks.items() if name != "throughput")


def test_compact_summary_names_every_verdict() -> None:
    results = [
        gpu_check.CheckResult("greedy equality fp32", True, "", {"exact": 4, "streams": 4}),
        gpu_check.CheckResult("throughput", False, "", {"rows": [{"streams": 32, "ratio": 0.5}]}),
        gpu_check.CheckResult("NVML metrics", None, ""),
    ]
    line = gpu_check.compact(results, 12.0, "cpu")
    assert line == "gpu-check FAILED on cpu in 12.0 s: fp32 ok 4/4; throughput FAIL 32:0.50x; NVML metrics n/a"
