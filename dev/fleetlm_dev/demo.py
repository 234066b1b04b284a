"""The local demo behind `make demo`: FleetLM's closed loop on this machine, nothing downloaded.

1. A real Kubernetes control plane on loopback (`fleetlm-dev cluster up`), the LLMService CRD, and the
   operator (`fleetlm-operator`) watching one namespace.
2. An LLMService on the built-in tiny model with an SLO (TTFT, TPOT) and autoscaling. The operator renders
   its Deployment, ConfigMap, Secret and Service; `pod_runner` plays the kubelet and runs each pod's
   container command as a real `fleetlm-runtime` process on a loopback address of its own.
3. Traffic in three phases (calm, a surge, calm again), streamed from a client here to the ready pods.
   Every few seconds a line shows the load, the replicas the tuner asked for and those ready, the TTFT
   the client saw, and the tuner's last decision with its reason (from the LLMService's status).
4. A PNG of load, replicas and TTFT over time; then everything is stopped (`--keep` leaves the control
   plane up, with `kubectl` pointed at it through the printed KUBECONFIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import yaml

from fleetlm_dev import cluster, paths, pod_runner, testing

NAMESPACE = "fleetlm-demo"
NAME = "tiny-demo"
REPORT_EVERY_S = 5.0


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    requests_per_s: float


# Sized for a 2-core machine. Batches are capped at 4 sequences per pod, and the surge keeps about 3
# requests in flight: one pod would run its batches full (queueing, TTFT up), so the tuner adds pods and
# gives them back when the surge is over. It stays well below what the machine can compute: on CPU a
# pod's steps take one core, so more load would only show a saturated machine, not the tuner.
PHASES = (Phase("calm", 30, 1.0), Phase("surge", 75, 10.0), Phase("calm again", 75, 1.0))
MAX_TOKENS = 256


def llmservice() -> dict[str, Any]:
    return {
        "apiVersion": "fleetlm.dev/v1alpha1",
        "kind": "LLMService",
        "metadata": {"name": NAME, "namespace": NAMESPACE},
        "spec": {
            "model": {"source": "builtin:tiny", "dtype": "float32"},
            "runtime": {"gpus": 0},
            "replicas": {"min": 1, "max": 3},
            "slo": {"ttft": "1s", "tpot": "100ms", "window": "15s"},
            "batching": {
                "maxBatchSize": 4,
                "maxBatchTokens": 512,
                "maxBatchSizeRange": {"min": 2, "max": 8},
                "maxBatchTokensRange": {"min": 128, "max": 1024},
            },
            "autoscaling": {"enabled": True, "interval": "5s", "scaleDownStabilization": "30s"},
        },
    }


@dataclass
class Sample:
    t_s: float
    requests_per_s: float
    desired: int
    ready: int
    ttft_p90_s: float | None
    slo_met: str


@dataclass
class Traffic:
    """Client-side record: the phase's arrival rate, TTFTs of requests since the last report."""

    requests_per_s: float = 0.0
    ttfts: list[float] = field(default_factory=list)
    failed: int = 0


def main(*, dir: pathlib.Path, keep: bool) -> int:
    dir.mkdir(parents=True, exist_ok=True)
    say(f"1/4 starting a local Kubernetes control plane in {dir} ...")
    plane = cluster.up(dir)
    operator: subprocess.Popen[bytes] | None = None
    runner: pod_runner.PodRunner | None = None
    try:
        say(f"    up: export KUBECONFIG={plane.kubeconfig}")
        install_crd(plane)
        plane.kubectl("create", "namespace", NAMESPACE)
        operator = start_operator(plane, dir)
        say(f"    operator running (log: {dir / 'operator.log'})")
        say(f"2/4 applying LLMService {NAMESPACE}/{NAME}: builtin:tiny, TTFT 1s, TPOT 100ms, 1-3 replicas")
        plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(llmservice()))
        testing.wait_for("the operator to create the Deployment", lambda: _get(plane, "deployment", NAME), timeout_s=60)
        selector = _get(plane, "deployment", NAME)["spec"]["selector"]["matchLabels"]
        runner = pod_runner.PodRunner(
            plane=plane,
            namespace=NAMESPACE,
            selector=",".join(f"{k}={v}" for k, v in sorted(selector.items())),
            directory=dir / "pods",
        )
        wait_first_pod(runner)
        say("3/4 traffic: " + ", then ".join(f"{p.name} {p.requests_per_s:g} req/s for {p.seconds:g}s" for p in PHASES))
        samples, failed = asyncio.run(drive(plane, runner))
        plot = dir / "demo.png"
        draw(samples, plot)
        summarize(samples, plot, failed=failed)
        return 0
    finally:
        say("4/4 stopping the runtime pods, the operator" + ("" if keep else " and the control plane"))
        if runner is not None:
            runner.stop_all()
        if operator is not None:
            testing.stop_process(operator, timeout_s=20)
        if keep:
            say(f"    the control plane is still up: export KUBECONFIG={plane.kubeconfig}")
            say(f"    stop it with: fleetlm-dev cluster down --dir {dir}")
        else:
            plane.stop()
            cluster.down(dir)


def say(line: str) -> None:
    print(line, flush=True)


def install_crd(plane: cluster.ControlPlane) -> None:
    from fleetlm_operator.api import crdgen  # noqa: PLC0415  (the operator package, only for the demo)

    plane.kubectl("apply", "--server-side", "-f", "-", input=crdgen.dump_yaml(crdgen.render_crd()))
    plane.kubectl("wait", "--for=condition=Established", "crd/llmservices.fleetlm.dev", "--timeout=60s")


def start_operator(plane: cluster.ControlPlane, dir: pathlib.Path) -> subprocess.Popen[bytes]:
    binary = paths.venv_bin("fleetlm-operator")
    command = [str(binary)] if binary else [sys.executable, "-m", "fleetlm_operator"]
    env = {
        **os.environ,
        "KUBECONFIG": str(plane.kubeconfig),
        "FLEETLM_OPERATOR_NAMESPACE": NAMESPACE,
        "FLEETLM_METRICS_PORT": "0",
        "FLEETLM_HEALTH_PORT": "0",
    }
    with (dir / "operator.log").open("wb") as log:
        return subprocess.Popen([*command, "-n", NAMESPACE], stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_first_pod(runner: pod_runner.PodRunner) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for event in runner.sync():
            say(f"    {event}")
        if runner.ready_urls():
            return
        time.sleep(0.5)
    raise RuntimeError("the first runtime pod did not become ready within 120 s")


async def drive(plane: cluster.ControlPlane, runner: pod_runner.PodRunner) -> tuple[list[Sample], int]:
    """Run the phases; the report samples and how many requests failed."""
    traffic = Traffic()
    samples: list[Sample] = []
    started = time.monotonic()
    stop = asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        tasks = [
            asyncio.create_task(_kubelet(runner, stop)),
            asyncio.create_task(_report(plane, runner, traffic=traffic, samples=samples, started=started, stop=stop)),
        ]
        inflight: set[asyncio.Task[None]] = set()
        rng = random.Random(7)
        for phase in PHASES:
            phase_end = time.monotonic() + phase.seconds
            traffic.requests_per_s = phase.requests_per_s
            while time.monotonic() < phase_end:
                await asyncio.sleep(rng.expovariate(phase.requests_per_s))
                urls = runner.ready_urls()
                if not urls:
                    continue
                task = asyncio.create_task(_one_request(session, rng.choice(urls), traffic))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
        if inflight:
            await asyncio.wait(inflight, timeout=60)
        stop.set()
        await asyncio.gather(*tasks)
    return samples, traffic.failed


async def _one_request(session: aiohttp.ClientSession, url: str, traffic: Traffic) -> None:
    body = {
        "model": "tiny",
        "prompt": "Write a long story about a fleet of language models keeping their promises.",
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": True,
    }
    start = time.monotonic()
    try:
        async with session.post(url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                traffic.failed += 1
                return
            first = True
            async for line in resp.content:
                if first and line.startswith(b"data:"):
                    traffic.ttfts.append(time.monotonic() - start)
                    first = False
    except (aiohttp.ClientError, TimeoutError):
        traffic.failed += 1


async def _kubelet(runner: pod_runner.PodRunner, stop: asyncio.Event) -> None:
    while not stop.is_set():
        for event in await asyncio.to_thread(runner.sync):
            say(f"    {event}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def _report(
    plane: cluster.ControlPlane,
    runner: pod_runner.PodRunner,
    *,
    traffic: Traffic,
    samples: list[Sample],
    started: float,
    stop: asyncio.Event,
) -> None:
    last_decision = None
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), REPORT_EVERY_S)
        svc = await asyncio.to_thread(_get, plane, "llmservice", NAME) or {}
        deployment = await asyncio.to_thread(_get, plane, "deployment", NAME) or {}
        status = svc.get("status", {}) or {}
        ttfts, traffic.ttfts = traffic.ttfts, []
        p90 = statistics.quantiles(ttfts, n=10)[-1] if len(ttfts) >= 2 else (ttfts[0] if ttfts else None)
        slo = next((c for c in status.get("conditions", []) if c.get("type") == "SLOMet"), {})
        sample = Sample(
            t_s=time.monotonic() - started,
            requests_per_s=traffic.requests_per_s,
            desired=int(deployment.get("spec", {}).get("replicas") or 0),
            ready=len(runner.ready_urls()),
            ttft_p90_s=p90,
            slo_met=str(slo.get("status", "?")),
        )
        samples.append(sample)
        ttft = f"{p90:5.2f}s" if p90 is not None else "    - "
        say(
            f"  t={sample.t_s:5.0f}s  load {sample.requests_per_s:4.1f} req/s  replicas {sample.desired} asked, "
            f"{sample.ready} ready  client TTFT p90 {ttft}  SLOMet {sample.slo_met}"
        )
        decisions = status.get("decisions") or []
        if decisions and decisions[-1] != last_decision:
            last_decision = decisions[-1]
            if last_decision.get("action") != "hold":
                say(f"      tuner: {last_decision.get('action')}: {str(last_decision.get('reason'))[:220]}")


def _get(plane: cluster.ControlPlane, kind: str, name: str) -> dict[str, Any] | None:
    proc = plane.kubectl("get", kind, name, "-n", NAMESPACE, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def draw(samples: list[Sample], path: pathlib.Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    t = [s.t_s for s in samples]
    fig, (load, reps, ttft) = plt.subplots(3, 1, sharex=True, figsize=(9, 7))
    load.step(t, [s.requests_per_s for s in samples], where="post")
    load.set_ylabel("load (req/s)")
    reps.step(t, [s.desired for s in samples], where="post", label="asked by the tuner")
    reps.step(t, [s.ready for s in samples], where="post", label="ready")
    reps.set_ylabel("replicas")
    reps.legend(loc="upper right")
    ttft.plot(t, [s.ttft_p90_s if s.ttft_p90_s is not None else float("nan") for s in samples], marker=".")
    ttft.axhline(1.0, color="red", linestyle="--", label="TTFT SLO")
    ttft.set_ylabel("client TTFT p90 (s)")
    ttft.set_xlabel("seconds")
    ttft.legend(loc="upper right")
    fig.suptitle("fleetlm demo: the SLO tuner on the built-in tiny model")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarize(samples: list[Sample], plot: pathlib.Path, *, failed: int) -> None:
    peak = max((s.desired for s in samples), default=0)
    final = samples[-1].desired if samples else 0
    met = [s for s in samples if s.ttft_p90_s is not None and s.ttft_p90_s <= 1.0]
    measured = [s for s in samples if s.ttft_p90_s is not None]
    share = f"{len(met) / len(measured):.0%}" if measured else "-"
    say(f"    replicas: 1 at the start, {peak} at the peak, {final} at the end")
    say(f"    report intervals with client TTFT p90 within the 1s SLO: {share} ({len(met)}/{len(measured)})")
    say(f"    requests that failed (an error status or a broken stream): {failed}")
    say(f"    plot: {plot}")
