"""The local demo behind `make demo`: FleetLM's closed loop on this machine, nothing downloaded.

1. A real Kubernetes control plane on loopback (`fleetlm-dev cluster up`), the LLMService CRD, and the
   operator (`fleetlm-operator`) watching one namespace.
2. An LLMService on the built-in tiny model with three traffic classes from API keys (critical, standard,
   sheddable), an SLO and autoscaling. The operator renders its Deployment, ConfigMap, Secrets and
   Service; `pod_runner` plays the kubelet and runs each pod's container command as a real
   `fleetlm-runtime` process on a loopback address of its own.
3. This machine's capacity: what one replica serves per second, measured before the surge, which is
   then sized from it (calm at half of it, a surge at 2.5x, calm again). The capacity is measured with
   critical and standard requests together, and each pod is held to its share of the machine's cores.
4. Traffic spread over the ready pods as a Service would. Every interval (5 s, the operator's) one line
   shows the load, the replicas asked and ready, the TTFT at the SLO's percentile per class, the requests
   shed, and the tuner's action. Then a plot (per-class TTFT against its target, replicas, shed rate) and
   one verdict line per class; everything is stopped (`--keep` leaves the control plane up).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import pathlib
import threading
import time
from typing import Any

from fleetlm_dev import closed_loop, cluster

NAMESPACE = "fleetlm-demo"
NAME = "tiny-demo"
INTERVAL_S = 5.0
TTFT_TARGET_S = 1.0
PERCENTILE = 90.0
CLASSES = ("critical", "standard", "sheddable")
KEYS = {"demo-critical-key": "critical", "demo-standard-key": "standard", "demo-sheddable-key": "sheddable"}
MAX_REPLICAS = 3
# Half of the traffic is sheddable (batch jobs, evaluations): at the surge's 2.5x, critical and standard
# alone are 1.25x what one replica serves, so the scale-out is needed for them, and the sheddable half is
# what the runtime and the tuner refuse while the new pods start and once the fleet is at its maximum.
MIX = (("critical", 0.2), ("standard", 0.3), ("sheddable", 0.5))
SHAPE = closed_loop.Shape(output_tokens=64)
BATCH = 4  # spec.batching.maxBatchSize at the start
PROBE_STREAMS = 4 * BATCH


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    times_capacity: float  # the load, as a multiple of one replica's measured capacity


PHASES = (Phase("calm", 30, 0.5), Phase("surge", 75, 2.5), Phase("calm again", 60, 0.3))


def llmservice() -> dict[str, Any]:
    return {
        "apiVersion": "fleetlm.dev/v1alpha1",
        "kind": "LLMService",
        "metadata": {"name": NAME, "namespace": NAMESPACE},
        "spec": {
            "model": {"source": "builtin:tiny", "dtype": "float32"},
            # Each pod gets its share of this machine's cores when the most replicas run, enforced as a CFS
            # quota by the kubelet stand-in: one replica's measured capacity is then what its share serves,
            # and each replica added adds its share. Unlimited, the probe's one pod took a whole core (106
            # req/s) and three pods sharing two cores with the load generator served nowhere near 3x that.
            "runtime": {"gpus": 0, "resources": {"limits": {"cpu": closed_loop.pod_cpu_limit(MAX_REPLICAS)}}},
            "replicas": {"min": 1, "max": MAX_REPLICAS},
            "slo": {"ttft": f"{TTFT_TARGET_S:g}s", "percentile": PERCENTILE, "window": "15s"},
            "batching": {
                "maxBatchSize": BATCH,
                "maxBatchTokens": 512,
                "maxBatchSizeRange": {"min": 2, "max": 8},
                "maxBatchTokensRange": {"min": 128, "max": 1024},
            },
            "qos": {
                "classes": [
                    {"name": "critical", "priority": 0},
                    {"name": "standard", "priority": 1},
                    {"name": "sheddable", "priority": 2, "sheddable": True},
                ],
                "defaultClass": "standard",
            },
            # Switched on after the capacity probe (main): the probe saturates the replica on purpose.
            "autoscaling": {"enabled": False, "interval": f"{INTERVAL_S:g}s", "scaleDownStabilization": "30s"},
        },
    }


@dataclasses.dataclass
class Line:
    """One interval as printed and plotted."""

    t_s: float
    requests_per_s: float
    desired: int
    ready: int
    ttft: dict[str, float | None]  # per class, at the SLO's percentile
    shed: int
    failed_unshed: int  # failures other than a 429 of the sheddable class
    action: str


def main(*, dir: pathlib.Path, keep: bool) -> int:
    dir.mkdir(parents=True, exist_ok=True)
    say(f"1/5 starting a local Kubernetes control plane in {dir} ...")
    plane = cluster.up(dir)
    service: closed_loop.Service | None = None
    try:
        say(f"    up: export KUBECONFIG={plane.kubeconfig}")
        closed_loop.install_crd(plane)
        plane.kubectl("create", "namespace", NAMESPACE)
        say(
            f"2/5 applying LLMService {NAMESPACE}/{NAME}: builtin:tiny, TTFT {TTFT_TARGET_S:g}s at p{PERCENTILE:g}, "
            f"1-3 replicas, classes {', '.join(CLASSES)} (from API keys)"
        )
        service = closed_loop.Service(plane, NAMESPACE, llmservice(), dir / "demo", api_keys=KEYS)
        say(f"    operator running (log: {service.operators[0].log_path})")
        service.start_pods()
        say("3/5 measuring what one replica serves on this machine ...")
        # Critical and standard streams in turn, four times as many as a batch holds: the queue stays deep
        # and critical preempts running standard requests (which recompute), as in the surge once
        # sheddable is shed. A probe of one class with an empty queue overstates what the mix gets.
        capacity = closed_loop.measure_capacity(
            service.ready_urls()[0], concurrency=PROBE_STREAMS, shape=SHAPE, seconds=8,
            keys=("demo-critical-key", "demo-standard-key"),
        )  # fmt: skip
        say(
            f"    one replica ({closed_loop.pod_cpu_limit(MAX_REPLICAS)} CPU): {capacity:.1f} requests/s of critical "
            f"and standard ({SHAPE.output_tokens} tokens each, batches of {BATCH})"
        )
        # Autoscaling goes on once the tuner judges a window that began after the probe: acting on the
        # probe's saturation, it would scale out before the surge and flatter the verdicts.
        settled_s = service.wait_window_after(time.time() + 1.0)
        service.patch({"autoscaling": {"enabled": True}})
        say(f"    autoscaling on ({settled_s:.0f}s later, once a tuner window began after the probe)")
        say("4/5 traffic: " + ", then ".join(
            f"{p.name} {p.times_capacity:g}x ({p.times_capacity * capacity:.1f} req/s) for {p.seconds:g}s"
            for p in PHASES
        ))  # fmt: skip
        lines, load = run(service, capacity)
        plot = dir / "demo.png"
        draw(lines, plot)
        say("5/5 verdicts")
        verdicts(lines, load, plot)
        return 0
    finally:
        say("    stopping the runtime pods, the operator" + ("" if keep else " and the control plane"))
        if service is not None:
            service.close()
        if keep:
            say(f"    the control plane is still up: export KUBECONFIG={plane.kubeconfig}")
            say(f"    stop it with: fleetlm-dev cluster down --dir {dir}")
        else:
            plane.stop()
            cluster.down(dir)


def say(line: str) -> None:
    print(line, flush=True)


def phase_at(t: float) -> Phase:
    end = 0.0
    for phase in PHASES:
        end += phase.seconds
        if t < end:
            return phase
    return PHASES[-1]


def run(service: closed_loop.Service, capacity: float) -> tuple[list[Line], closed_loop.Load]:
    load = closed_loop.Load(service.ready_urls, shape=SHAPE, mix=MIX, keys={c: k for k, c in KEYS.items()})
    lines: list[Line] = []
    stop = threading.Event()
    reporter = threading.Thread(target=_report, args=(service, load, capacity, lines, stop), daemon=True)
    total = sum(p.seconds for p in PHASES)
    reporter.start()
    try:
        asyncio.run(load.run(lambda t: phase_at(t).times_capacity * capacity, total))
    finally:
        stop.set()
        reporter.join(timeout=30)
    return lines, load


def _report(
    service: closed_loop.Service,
    load: closed_loop.Load,
    capacity: float,
    lines: list[Line],
    stop: threading.Event,
) -> None:
    seen_decisions: set[str] = set()
    while load.began_s == 0.0 and not stop.wait(0.1):
        pass
    index = 0
    while not stop.wait(max(0.0, load.began_s + (index + 1) * INTERVAL_S - time.monotonic())):
        start = load.began_s + index * INTERVAL_S
        index += 1
        window = [r for r in list(load.records) if start <= r.start_s < start + INTERVAL_S and r.end_s]
        ttft = {}
        for cls in CLASSES:
            values = [r.ttft_s for r in window if r.qos_class == cls and r.ttft_s is not None]
            ttft[cls] = closed_loop.quantile(values, PERCENTILE / 100)
        decisions = service.status().get("decisions") or []
        fresh = [d for d in decisions if d.get("time", "") + d.get("action", "") not in seen_decisions]
        seen_decisions.update(d.get("time", "") + d.get("action", "") for d in decisions)
        acted = [d for d in fresh if d.get("action") != "hold"]
        action = "; ".join(f"{d.get('action')}: {str(d.get('reason'))[:90]}" for d in acted) or "hold"
        line = Line(
            t_s=start + INTERVAL_S - load.began_s,
            requests_per_s=phase_at(start - load.began_s).times_capacity * capacity,
            desired=service.desired_replicas(),
            ready=len(service.ready_urls()),
            ttft=ttft,
            shed=sum(1 for r in window if r.status == 429),
            failed_unshed=sum(
                1 for r in window if not r.success and not (r.status == 429 and r.qos_class == "sheddable")
            ),
            action=action,
        )
        lines.append(line)
        per_class = "  ".join(f"{c} {_fmt(line.ttft[c])}" for c in CLASSES)
        say(
            f"  t={line.t_s:4.0f}s {line.requests_per_s:5.1f} req/s  replicas {line.desired} asked {line.ready} ready  "
            f"TTFT p{PERCENTILE:g}: {per_class}  shed {line.shed:3d}  tuner: {line.action}"
        )


def _fmt(value: float | None) -> str:
    return f"{value:5.2f}s" if value is not None else "   -  "


def draw(lines: list[Line], path: pathlib.Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    t = [line.t_s for line in lines]
    fig, (ttft, reps, shed) = plt.subplots(3, 1, sharex=True, figsize=(9, 8))
    for cls in CLASSES:
        ttft.plot(t, [line.ttft[cls] if line.ttft[cls] is not None else float("nan") for line in lines],
                  marker=".", label=cls)  # fmt: skip
    ttft.axhline(TTFT_TARGET_S, color="red", linestyle="--", label="TTFT target")
    ttft.set_ylabel(f"TTFT p{PERCENTILE:g} (s)")
    ttft.set_yscale("log")
    ttft.legend(loc="upper right")
    reps.step(t, [line.desired for line in lines], where="post", label="asked by the tuner")
    reps.step(t, [line.ready for line in lines], where="post", label="ready")
    reps.set_ylabel("replicas")
    reps.legend(loc="upper right")
    shed.plot(t, [line.shed / INTERVAL_S for line in lines], marker=".", color="tab:orange")
    shed.set_ylabel("shed (429/s)")
    shed.set_xlabel("seconds")
    fig.suptitle("fleetlm demo: the SLO tuner on the built-in tiny model, three classes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def verdicts(lines: list[Line], load: closed_loop.Load, plot: pathlib.Path) -> None:
    surge_start = PHASES[0].seconds
    surge_end = surge_start + PHASES[1].seconds
    surge = [line for line in lines if surge_start < line.t_s <= surge_end]
    peak = max((line.desired for line in lines), default=0)
    say(f"    replicas: 1 at the start, {peak} at the peak, {lines[-1].desired if lines else 0} at the end")
    for cls in CLASSES:
        records = [r for r in load.records if r.qos_class == cls]
        measured = [line for line in surge if line.ttft[cls] is not None]
        kept = [line for line in measured if line.ttft[cls] <= TTFT_TARGET_S]  # type: ignore[operator]
        share = len(kept) / len(measured) if measured else 0.0
        shed = sum(1 for r in records if r.status == 429)
        failed = sum(1 for r in records if not r.success and r.status != 429)
        served = sum(1 for r in records if r.success)
        if cls == "critical":
            ok = share >= 0.95 and failed == 0 and shed == 0
            rule = "needs >= 95% of the surge's intervals, nothing refused or failed"
        elif cls == "standard":
            ok = failed == 0 and shed == 0
            rule = "may degrade; needs every request served"
        else:
            ok = failed == 0
            rule = "may be shed (429 + Retry-After); no other failure"
        errors = collections.Counter(f"{r.status} {r.error[:60]}" for r in records if not r.success and r.status != 429)
        why = "; ".join(f"{count} x {error}" for error, count in errors.most_common(3))
        say(
            f"    {'PASS' if ok else 'FAIL'} {cls:9s}: TTFT p{PERCENTILE:g} <= {TTFT_TARGET_S:g}s in {share:.0%} of"
            f" the surge's intervals ({len(kept)}/{len(measured)}); served {served}/{len(records)}, shed {shed}, "
            f"failed {failed}{f' [{why}]' if why else ''} ({rule})"
        )
    say(f"    plot: {plot}")
