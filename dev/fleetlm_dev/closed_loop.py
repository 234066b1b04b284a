"""The closed loop on this machine, as pieces the end-to-end suite (e2e/) and the demo share.

* `Service`: an LLMService on the local control plane, its operator replicas run as the real
  `fleetlm-operator` console script (kept running as a Deployment would: `supervise.Supervised`), and its
  pods run by `pod_runner` (the kubelet stand-in, on a thread) as real `fleetlm-runtime` processes.
* `Load`: a load generator that spreads requests over the *ready* endpoints in turn, as a Service's
  kube-proxy would, with Poisson arrivals at a rate that may change over time, per-class API keys, and a
  record of every request (`bench_serve.send_request` does the HTTP and the timing).
* `measure_capacity`: what one replica completes per second on this machine with the service's request
  shape, measured first so that each scenario sizes its load from it rather than from a constant.
* `Timeline`: one sample per interval of what the operator asked for and did (replicas asked and ready,
  decisions), and `per_interval` to cut the request record into the same intervals.

Only for tests and the demo.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import os
import pathlib
import random
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
import yaml
from prometheus_client import parser as prom_parser

from fleetlm_dev import bench_serve, cluster, cpu_limits, pod_runner, supervise, testing

PROMPT = "Write a long story about a fleet of language models keeping their promises to every client."


# Of this machine's cores, the share the runtime pods get together at a service's max replicas; the rest
# is for the control plane, the operator, the kubelet stand-in and the load generator (at a surge to 2.5x
# one replica's capacity, about half a core on 2 cores: with 0.6 for the pods, the load generator fell
# behind and the TTFT it measured was its own lag).
PODS_SHARE = 0.45


def pod_cpu_limit(max_replicas: int, *, share: float = PODS_SHARE) -> str:
    """A runtime pod's `limits.cpu`: its share of this machine when the most replicas run. The kubelet
    stand-in enforces it (a CFS quota, as the kubelet does), so one replica's capacity is what its share
    serves and a replica added adds its share. Without it, on a 2-core machine, three replicas serve little
    more than one, as each takes all the CPU it can get, and no scale-out can keep a surge's promise."""
    return f"{int(1000 * min(1.0, share * cpu_limits.machine_cores() / max_replicas))}m"


def install_crd(plane: cluster.ControlPlane) -> None:
    from fleetlm_operator.api import crdgen  # noqa: PLC0415  (the operator package, only here)

    plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                  input=crdgen.dump_yaml(crdgen.render_crd()))  # fmt: skip
    plane.wait_established("crd/llmservices.fleetlm.dev")


# --------------------------------------------------------------------------------------------------
# The service: operators, pods, the object


class Service:
    """One LLMService with its operator replicas and its pods; `close()` stops everything it started."""

    def __init__(
        self,
        plane: cluster.ControlPlane,
        namespace: str,
        body: dict[str, Any],
        workdir: pathlib.Path,
        *,
        operators: int = 1,
        lease_duration_s: int = 15,
        api_keys: dict[str, str] | None = None,
    ) -> None:
        self.plane = plane
        self.namespace = namespace
        self.name = str(body["metadata"]["name"])
        self.workdir = workdir
        self.operators: list[supervise.Supervised] = []
        self.identities: list[str] = []
        self.metrics_ports: list[int] = []
        self.runner: pod_runner.PodRunner | None = None
        self.events: list[tuple[float, str]] = []
        self._halt = threading.Event()
        self._kubelet: threading.Thread | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        if api_keys:
            secret = {
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": f"{self.name}-keys", "namespace": namespace},
                "stringData": {"api-keys.yaml": yaml.safe_dump(api_keys)},
            }  # fmt: skip
            plane.kubectl("apply", "-f", "-", input=json.dumps(secret))
            body["spec"].setdefault("qos", {})["apiKeysSecretRef"] = {"name": f"{self.name}-keys"}
        script = pathlib.Path(sys.executable).parent / "fleetlm-operator"
        for index in range(operators):
            identity = f"operator-{index}"  # a pod keeps its name across container restarts
            port = testing.free_port()
            env = supervise.console_script_env(
                KUBECONFIG=str(plane.kubeconfig),
                FLEETLM_OPERATOR_NAMESPACE=namespace,
                FLEETLM_OPERATOR_IDENTITY=identity,
                FLEETLM_METRICS_PORT=str(port),
                FLEETLM_HEALTH_PORT="0",
                FLEETLM_LEASE_DURATION_S=str(lease_duration_s),
            )
            self.identities.append(identity)
            self.metrics_ports.append(port)
            self.operators.append(
                supervise.Supervised([str(script), "-n", namespace], env=env, log_path=workdir / f"{identity}.log")
            )
        body["metadata"]["namespace"] = namespace
        plane.kubectl("apply", "-f", "-", input=json.dumps(body))

    # What the control plane says ------------------------------------------------------------------

    def get(self, kind: str, name: str | None = None) -> dict[str, Any] | None:
        proc = self.plane.kubectl("get", kind, name or self.name, "-n", self.namespace, "-o", "json", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def desired_replicas(self) -> int:
        deployment = self.get("deployment") or {}
        return int(deployment.get("spec", {}).get("replicas") or 0)

    def status(self) -> dict[str, Any]:
        return dict((self.get("llmservice") or {}).get("status") or {})

    def wait_window_after(self, since_s: float, *, timeout_s: float = 60.0) -> float:
        """Wait until the tuner's last tick (status.observed) judged a window that began after `since_s`
        (unix time, as the operator stamps it); the seconds it took. Autoscaling switched on after a
        capacity probe acts only on windows without the probe's saturation once this returns."""
        began = time.monotonic()
        while True:
            observed = self.status().get("observed") or {}
            at, span = observed.get("collectedAt"), observed.get("windowSeconds")
            if at and span is not None and datetime.datetime.fromisoformat(at).timestamp() - span > since_s:
                return time.monotonic() - began
            if time.monotonic() - began > timeout_s:
                raise TimeoutError(f"no tuner window began after {since_s:.0f} within {timeout_s}s: {observed}")
            time.sleep(0.5)

    def lease_holder(self) -> tuple[str | None, str | None]:
        spec = (self.get("lease", "fleetlm-operator") or {}).get("spec", {})
        return spec.get("holderIdentity"), spec.get("renewTime")

    def leaders(self) -> list[str]:
        """The operator replicas that say they lead (their `fleetlm_operator_leader` gauge is 1)."""
        leading = []
        for identity, port in zip(self.identities, self.metrics_ports, strict=True):
            url = f"http://127.0.0.1:{port}/metrics"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:
                if "fleetlm_operator_leader 1.0" in resp.read().decode():
                    leading.append(identity)
        return leading

    def patch(self, spec: dict[str, Any]) -> None:
        """A merge patch of the LLMService's spec, as `kubectl patch --type=merge` does."""
        self.plane.kubectl("patch", "llmservice", self.name, "-n", self.namespace, "--type=merge",
                           "-p", json.dumps({"spec": spec}))  # fmt: skip

    def live_config(self, url: str) -> dict[str, Any]:
        """The config a runtime has in force (GET /admin/config with the service's admin token)."""
        secret = self.get("secret", f"{self.name}-admin-token") or {}
        token = base64.b64decode(secret.get("data", {}).get("token", "")).decode()
        request = urllib.request.Request(url + "/admin/config", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=5) as resp:
            return dict(json.loads(resp.read())["config"])

    def wait_pushed(self, check: Callable[[dict[str, Any]], bool], *, timeout_s: float = 60) -> float:
        """Wait until every ready pod's live config passes `check` (the operator pushes spec changes to the
        runtimes once per tuning interval); the seconds it took."""
        began = time.monotonic()
        while not all(check(self.live_config(url)) for url in self.ready_urls()):
            if time.monotonic() - began > timeout_s:
                raise TimeoutError(f"the pods did not take the change within {timeout_s}s")
            time.sleep(0.5)
        return time.monotonic() - began

    def operator(self, identity: str) -> supervise.Supervised:
        return self.operators[self.identities.index(identity)]

    # The kubelet ------------------------------------------------------------------------------------

    def start_pods(self, *, timeout_s: float = 120) -> None:
        """Wait for the Deployment, then run its pods (a thread syncs every half second)."""
        deadline = time.monotonic() + timeout_s
        while (deployment := self.get("deployment")) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the operator created no Deployment {self.namespace}/{self.name}")
            time.sleep(0.5)
        labels = deployment["spec"]["selector"]["matchLabels"]
        self.runner = pod_runner.PodRunner(
            plane=self.plane, namespace=self.namespace,
            selector=",".join(f"{k}={v}" for k, v in sorted(labels.items())), directory=self.workdir / "pods",
        )  # fmt: skip
        self._kubelet = threading.Thread(target=self._sync_forever, name="kubelet", daemon=True)
        self._kubelet.start()
        while len(self.ready_urls()) < 1:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no pod of {self.name} became ready; events: {self.events[-10:]}")
            time.sleep(0.3)

    def _sync_forever(self) -> None:
        assert self.runner is not None
        while not self._halt.is_set():
            try:
                for event in self.runner.sync():
                    self.events.append((time.monotonic(), event))
            except cluster.ClusterError as error:  # the API server may be down (an outage scenario)
                self.events.append((time.monotonic(), f"kubelet sync failed: {error}"[:300]))
            self._halt.wait(0.5)

    def ready_urls(self) -> list[str]:
        return self.runner.ready_urls() if self.runner is not None else []

    def wait_ready(self, count: int, *, timeout_s: float = 120) -> float:
        """Wait until `count` pods serve; the seconds it took."""
        began = time.monotonic()
        while len(self.ready_urls()) < count:
            if time.monotonic() - began > timeout_s:
                raise TimeoutError(f"{len(self.ready_urls())}/{count} pods ready after {timeout_s}s")
            time.sleep(0.2)
        return time.monotonic() - began

    def close(self) -> None:
        self._halt.set()
        if self._kubelet is not None:
            self._kubelet.join(timeout=10)
        # All at once: each process drains and exits on SIGTERM in its own time (seconds on a busy machine).
        stops = [threading.Thread(target=operator.stop, kwargs={"timeout_s": 20}) for operator in self.operators]
        if self.runner is not None:
            stops.append(threading.Thread(target=self.runner.stop_all))
        for stop in stops:
            stop.start()
        for stop in stops:
            stop.join()


# --------------------------------------------------------------------------------------------------
# Load


@dataclasses.dataclass(slots=True)
class Record:
    qos_class: str
    url: str
    start_s: float  # time.monotonic()
    end_s: float
    status: int
    success: bool
    ttft_s: float | None
    error: str
    output_tokens: int
    retry_after: str | None = None
    due_s: float = math.nan  # when the arrival was scheduled: start_s - due_s is the load generator's lag


_serial = itertools.count()


@dataclasses.dataclass(frozen=True, slots=True)
class Shape:
    """The request every scenario sends: one prompt, a fixed number of streamed tokens."""

    output_tokens: int = 64
    prompt: str = PROMPT

    def request(self, qos_class: str | None = None) -> bench_serve.RequestSpec:
        # A serial number makes every prompt unique: the response cache must not answer repeats.
        prompt = f"{self.prompt} (request {next(_serial)})"
        return bench_serve.RequestSpec(prompt=prompt, prompt_len=0, output_len=self.output_tokens, qos_class=qos_class)


class Load:
    """Poisson arrivals at `rate(t)` requests/s (t: seconds since `run` began), class drawn from `mix`,
    each sent to the next ready endpoint in turn. Records every request in `records`."""

    def __init__(
        self,
        endpoints: Callable[[], Sequence[str]],
        *,
        shape: Shape = Shape(),
        mix: Sequence[tuple[str, float]] = (("default", 1.0),),
        keys: dict[str, str] | None = None,
        seed: int = 7,
        timeout_s: float = 120.0,
    ) -> None:
        self.endpoints = endpoints
        self.shape = shape
        self.mix = list(mix)
        self.keys = dict(keys or {})
        self.rng = random.Random(seed)
        self.timeout_s = timeout_s
        self.records: list[Record] = []
        # Requests not yet finished: endpoint and when the request began (inf until its task runs, which
        # on a busy event loop may be a while after it was due).
        self.inflight: dict[asyncio.Task[None], tuple[str, float]] = {}
        self.unrouted = 0  # arrivals while no endpoint was ready
        self.began_s = 0.0  # time.monotonic() when `run` began: t = 0 of `rate`
        self._turn = 0

    def _pick_class(self) -> str:
        point = self.rng.random() * sum(w for _, w in self.mix)
        for name, weight in self.mix:
            point -= weight
            if point <= 0:
                return name
        return self.mix[-1][0]

    async def run(
        self, rate: Callable[[float], float], duration_s: float, *, until: Callable[[float], bool] | None = None
    ) -> None:
        """Send for `duration_s` seconds, or until `until(elapsed)` says so, then wait for what is in flight.

        Arrivals are scheduled on the clock, each a random gap after the one before, and sent when due: a
        sleep of each gap in turn would add the event loop's lateness to every gap (with many streams in
        flight, a few ms a time), and at 100 req/s send a third of what was asked."""
        began = self.began_s = time.monotonic()
        due = began
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s, sock_read=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            while (elapsed := time.monotonic() - began) < duration_s and not (until and until(elapsed)):
                current = rate(elapsed)
                if current <= 0:
                    await asyncio.sleep(0.2)
                    due = time.monotonic()
                    continue
                due += self.rng.expovariate(current)
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                urls = list(self.endpoints())
                if not urls:
                    self.unrouted += 1
                    continue
                url = urls[self._turn % len(urls)]
                self._turn += 1
                task = asyncio.create_task(self._one(session, url, self._pick_class(), due))
                self.inflight[task] = (url, math.inf)
                task.add_done_callback(lambda t: self.inflight.pop(t, None))
            if self.inflight:
                await asyncio.wait(list(self.inflight), timeout=self.timeout_s)

    async def _one(self, session: aiohttp.ClientSession, url: str, qos_class: str, due: float) -> None:
        cfg = bench_serve.BenchConfig(
            url=url, model="tiny", class_keys=tuple(self.keys.items()), progress=False, timeout_s=self.timeout_s
        )
        spec = self.shape.request(qos_class)
        start = time.monotonic()
        if (task := asyncio.current_task()) in self.inflight:
            self.inflight[task] = (url, start)
        result = await bench_serve.send_request(session, cfg, "tiny", spec)
        self.records.append(Record(
            qos_class=qos_class, url=url, start_s=start, end_s=time.monotonic(), status=result.status,
            success=result.success, ttft_s=result.ttft_s if result.success else None, error=result.error,
            output_tokens=result.output_tokens, retry_after=result.retry_after, due_s=due,
        ))  # fmt: skip


def measure_capacity(
    url: str | Sequence[str],
    *,
    concurrency: int,
    shape: Shape = Shape(),
    seconds: float = 10.0,
    key: str | None = None,
    keys: Sequence[str] = (),
) -> float:
    """Requests/s completed with `concurrency` streams always open per replica (batches full): one
    replica's capacity for one URL, the service's for several at once (on a shared machine that is less
    than the sum). Scenarios size their load from it. A first round of requests warms every replica.

    `keys`: the streams' API keys in turn (else `key` for all). With classes of different priorities and more
    streams than a batch holds, the queue is never empty and a higher class's arrival preempts a running
    lower one (which recomputes later), as under an overload: the capacity such a mix gets (one runtime on
    builtin:tiny, 40 standard streams and 3 critical: 36 req/s; 40 standard alone: 51 req/s)."""
    urls = [url] if isinstance(url, str) else list(url)
    stream_keys: list[str | None] = [*keys] or [key]

    async def closed_loop() -> float:
        done = 0
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def one(target: str, api_key: str | None) -> bench_serve.RequestResult:
                cfg = bench_serve.BenchConfig(url=target, model="tiny", api_key=api_key, progress=False)
                return await bench_serve.send_request(session, cfg, "tiny", shape.request())

            streams = [(u, stream_keys[i % len(stream_keys)]) for u in urls for i in range(concurrency)]
            await asyncio.gather(*(one(u, k) for u, k in streams))
            began = time.monotonic()

            async def worker(target: str, api_key: str | None) -> None:
                nonlocal done
                while time.monotonic() - began < seconds:
                    result = await one(target, api_key)
                    if not result.success:
                        raise RuntimeError(f"capacity probe failed: {result.status} {result.error}")
                    done += 1

            await asyncio.gather(*(worker(u, k) for u, k in streams))
            return done / (time.monotonic() - began)

    return asyncio.run(closed_loop())


# --------------------------------------------------------------------------------------------------
# What the operator did, per interval


@dataclasses.dataclass(slots=True)
class Sample:
    t_s: float  # time.monotonic()
    desired: int
    ready: int
    decisions: int  # the length of status.decisions
    last_action: str | None
    shed: tuple[str, ...]


class Timeline(threading.Thread):
    """Samples the service every `every_s` seconds until stopped."""

    def __init__(self, service: Service, every_s: float) -> None:
        super().__init__(daemon=True, name="timeline")
        self.service = service
        self.every_s = every_s
        self.samples: list[Sample] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            with contextlib.suppress(cluster.ClusterError, json.JSONDecodeError):
                status = self.service.status()
                decisions = status.get("decisions") or []
                self.samples.append(Sample(
                    t_s=time.monotonic(), desired=self.service.desired_replicas(),
                    ready=len(self.service.ready_urls()), decisions=len(decisions),
                    last_action=decisions[-1].get("action") if decisions else None,
                    shed=tuple((status.get("tuning") or {}).get("shedClasses") or ()),
                ))  # fmt: skip
            self._halt.wait(self.every_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


def replica_minutes(samples: Sequence[Sample]) -> float:
    """Ready replicas integrated over time: what the service cost."""
    return sum(b.ready * (b.t_s - a.t_s) for a, b in itertools.pairwise(samples)) / 60


def attainment(records: Sequence[Record], target_s: float) -> float | None:
    """Share of requests served with TTFT within `target_s` (refused or failed ones miss); None if none."""
    if not records:
        return None
    return sum(1 for r in records if r.success and r.ttft_s is not None and r.ttft_s <= target_s) / len(records)


def arrival_rate(records: Sequence[Record], start_s: float, end_s: float) -> float:
    """Requests/s that arrived (were sent) between `start_s` and `end_s`: the load as delivered."""
    sent = sum(1 for r in records if start_s <= r.start_s < end_s)
    return sent / (end_s - start_s) if end_s > start_s else 0.0


def completion_rate(records: Sequence[Record], url: str, start_s: float, end_s: float) -> float:
    """Requests/s that `url` served to completion between `start_s` and `end_s` (by when they ended): what
    a saturated replica serves is its capacity under the conditions of the moment."""
    served = sum(1 for r in records if r.url == url and r.success and start_s <= r.end_s < end_s)
    return served / (end_s - start_s) if end_s > start_s else 0.0


def quantile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def per_interval(records: Sequence[Record], start_s: float, end_s: float, every_s: float) -> list[list[Record]]:
    """Requests by the interval they *arrived* in, from `start_s` on."""
    count = max(0, math.ceil((end_s - start_s) / every_s))
    buckets: list[list[Record]] = [[] for _ in range(count)]
    for record in records:
        index = int((record.start_s - start_s) // every_s)
        if 0 <= index < count:
            buckets[index].append(record)
    return buckets


# --------------------------------------------------------------------------------------------------
# Where the time goes: the server's own TTFT, and the CPU each side used


Histogram = dict[str, list[tuple[float, float]]]  # label value -> [(upper bound, cumulative count)]


def scrape(urls: Sequence[str], histogram: str, label: str, counter: str) -> tuple[Histogram, float]:
    """A histogram of the runtimes at `urls` (their /metrics), summed over them, by the value of `label`, and
    a counter's total over them."""
    summed: dict[str, dict[float, float]] = {}
    total = 0.0
    for url in urls:
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
            for family in prom_parser.text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == histogram + "_bucket":
                        buckets = summed.setdefault(sample.labels.get(label, ""), {})
                        bound = float(sample.labels["le"])
                        buckets[bound] = buckets.get(bound, 0.0) + sample.value
                    elif sample.name == counter + "_total":
                        total += sample.value
    return {key: sorted(buckets.items()) for key, buckets in summed.items()}, total


def histogram_quantile(before: Histogram, after: Histogram, key: str, q: float) -> float | None:
    """The upper bound of the bucket holding quantile `q` of what was observed between two scrapes (a
    pod that left meanwhile makes its counts drop out; then None). Prometheus's bucket bound, no interpolation."""
    earlier = dict(before.get(key, []))
    delta = [(bound, count - earlier.get(bound, 0.0)) for bound, count in after.get(key, [])]
    if not delta or delta[-1][1] <= 0 or any(c < 0 for _, c in delta):
        return None
    rank = q * delta[-1][1]
    return next(bound for bound, count in delta if count >= rank)


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user and system) a process and its live descendants used so far; 0 once it is gone."""
    ticks = os.sysconf("SC_CLK_TCK")
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        own = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        return own + sum(process_cpu_s(child) for child in testing.children_of(pid))
    except (OSError, IndexError, ValueError):
        return 0.0


def pods_cpu_s(service: Service) -> float:
    """CPU seconds the service's running pods (servers and engine children) used so far."""
    pods = list(service.runner.pods.values()) if service.runner is not None else []
    return sum(process_cpu_s(p.process.pid) for p in pods)


def harness_cpu_s() -> float:
    """CPU seconds this process (every thread: the load generator, the kubelet stand-in, the samplers) used."""
    times = os.times()
    return times.user + times.system


def lag_s(records: Sequence[Record]) -> list[float]:
    """How late each request was sent after its scheduled arrival: the load generator falling behind."""
    return [r.start_s - r.due_s for r in records if not math.isnan(r.due_s)]


@dataclasses.dataclass(slots=True)
class Snapshot:
    t_s: float  # time.monotonic()
    ttft: Histogram  # the runtimes' TTFT histogram by class
    preemptions: float  # the runtimes' preemptions so far
    harness_cpu_s: float
    pods_cpu_s: float  # the ready pods' processes (server and engine child)


class Diagnostics(threading.Thread):
    """Every `every_s` seconds, what the runtimes measured and the CPU each side used, so that a scenario can
    say where a client's TTFT went: into the engine's queue (the server's TTFT says so too), or into the
    load generator's lag or its own event loop (then the server's TTFT is short and the client's long)."""

    def __init__(self, service: Service, every_s: float = 2.5) -> None:
        super().__init__(daemon=True, name="diagnostics")
        self.service = service
        self.every_s = every_s
        self.snapshots: list[Snapshot] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            ttft, preemptions = scrape(self.service.ready_urls(), "fleetlm_time_to_first_token_seconds", "qos_class",
                                       "fleetlm_num_preemptions")  # fmt: skip
            self.snapshots.append(Snapshot(
                t_s=time.monotonic(), ttft=ttft, preemptions=preemptions,
                harness_cpu_s=harness_cpu_s(), pods_cpu_s=pods_cpu_s(self.service),
            ))  # fmt: skip
            self._halt.wait(self.every_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)

    def between(self, start_s: float, end_s: float) -> tuple[Snapshot, Snapshot] | None:
        """The first snapshot at or after `start_s` and the last at or before `end_s`."""
        inside = [x for x in self.snapshots if start_s <= x.t_s <= end_s]
        return (inside[0], inside[-1]) if len(inside) >= 2 else None

    def figures(self, start_s: float, end_s: float, classes: Sequence[str], q: float) -> dict[str, Any]:
        """Server TTFT at quantile `q` per class, and cores used by the harness and the pods, over the window."""
        pair = self.between(start_s, end_s)
        if pair is None:
            return {}
        first, last = pair
        wall = last.t_s - first.t_s
        return {
            "server_ttft_q_s": {c: histogram_quantile(first.ttft, last.ttft, c, q) for c in classes},
            "harness_cores": round((last.harness_cpu_s - first.harness_cpu_s) / wall, 2),
            "pods_cores": round((last.pods_cpu_s - first.pods_cpu_s) / wall, 2),
            "preemptions_per_s": round((last.preemptions - first.preemptions) / wall, 1),
            "window_s": round(wall, 1),
        }
