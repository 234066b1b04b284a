"""`fleetlm-dev bench router`: the router's prefix affinity and load balance against round-robin, in one run.

Three real `fleetlm-runtime` replicas on loopback, each with a bounded prefix cache (`--prefix-cache-tokens`,
by default 1600 tokens: room for three of the eight 512-token prefixes, as a real KV cache is bounded). Two
`fleetlm-router` processes in front of the same replicas: one with `--policy prefix-affinity`, one with
`--policy round-robin` (what a Service gives). Workloads, generated and measured by `bench_serve`:

- shared-prefix: 8 distinct 512-token prefixes plus a short unique question; TTFT p50 and the replicas'
  prefix-cache hit rate (hit tokens / queried tokens, read from their /metrics before and after);
- uniform: random prompts, no shared prefix; throughput and the busiest replica's mean in-flight
  (sampled from the router's own `fleetlm_router_in_flight`) against the mean over replicas;
- from zero: a router with no replica, a request arrives, the router asks for a replica (`--scale-file`),
  this harness plays the operator and starts one; TTFT minus the replica's start-up (spawn to /ready).

The two policies run alternately per workload (A/B/A/B) on the same replicas and requests, so machine
noise hits both; each round starts from cold caches (replicas restarted) so neither inherits the other's.
This module talks HTTP to processes it starts and stops by PID; it never imports torch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

import yaml

import fleetlm_router
from fleetlm_dev import bench_serve
from fleetlm_dev.testing import free_port

# Where this process imports fleetlm_router from, so the children it starts do too (an editable install made
# before the router existed has neither its path nor its `fleetlm-router` script).
_ROUTER_ROOT = str(pathlib.Path(fleetlm_router.__file__).resolve().parents[1])
PREFIX_QUERIES = "fleetlm_prefix_cache_queries_total"
PREFIX_HITS = "fleetlm_prefix_cache_hits_total"


def _command(name: str, module: str) -> list[str]:
    script = pathlib.Path(sys.executable).with_name(name)
    if script.exists():
        return [str(script)]
    found = shutil.which(name)
    return [found] if found else [sys.executable, "-m", module]


def _get(url: str, timeout_s: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


class Process:
    """A child process on a free loopback port, logged to a file, stopped by its own PID."""

    def __init__(self, argv: list[str], *, directory: pathlib.Path, port: int, name: str) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.name = name
        self.log_path = directory / f"{name}.log"
        self._log = self.log_path.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROUTER_ROOT, env.get("PYTHONPATH", "")) if p)
        self.started_s = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout_s: float = 600.0) -> float:
        """Block until /ready answers 200; seconds since spawn."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                if _get(self.url + "/ready", 1.0)[0] == 200:
                    return time.monotonic() - self.started_s
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout_s}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def stop(self, timeout_s: float = 20.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode


def runtime_config(
    *,
    model: str = "builtin:tiny",
    max_model_len: int = 1024,
    prefix_cache_tokens: int | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A runtime config for a local replica: response cache off (every request reaches the engine)."""
    prefix: dict[str, Any] = {"enabled": True}
    if prefix_cache_tokens is not None:
        prefix["maxTokens"] = prefix_cache_tokens
    data: dict[str, Any] = {
        "schemaVersion": "v1",
        "model": {"source": model, "dtype": "float32", "maxModelLen": max_model_len},
        "batching": {"maxBatchSize": 16, "maxBatchTokens": 1024, "maxQueueLen": 256},
        "server": {"drainGracePeriodS": 5},
        "caching": {"responseCache": {"enabled": False}, "prefixCache": prefix},
    }
    for section, values in (extra or {}).items():
        data.setdefault(section, {}).update(values)
    return data


def start_runtime(directory: pathlib.Path, config: dict[str, Any], *, name: str, host: str = "127.0.0.1") -> Process:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    argv = [*_command("fleetlm-runtime", "fleetlm_runtime"), "--config", str(path), "--port", str(port),
            "--host", host]  # fmt: skip
    proc = Process(argv, directory=directory, port=port, name=name)
    proc.url = f"http://{host}:{port}"
    return proc


def start_router(
    directory: pathlib.Path,
    *,
    endpoints_file: pathlib.Path,
    name: str = "router",
    args: Sequence[str] = (),
    port: int | None = None,
) -> Process:
    port = port or free_port()
    argv = [*_command("fleetlm-router", "fleetlm_router"), "--port", str(port),
            "--endpoints-file", str(endpoints_file), *args]  # fmt: skip
    return Process(argv, directory=directory, port=port, name=name)


def endpoints_name(url: str) -> str:
    """The name the router gives a replica listed by URL (`host:port`), as in its metrics and headers."""
    return url.rstrip("/").split("://", 1)[-1]


def write_endpoints(path: pathlib.Path, urls: Sequence[str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(u + "\n" for u in urls))
    tmp.replace(path)  # atomic: the router never reads half a list


def wait_scale_request(path: pathlib.Path, timeout_s: float = 60.0) -> None:
    """Block until the router's `--scale-file` carries a scale-up request (the harness plays the operator)."""
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and '"scale_up"' in path.read_text()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the router asked for no replica within {timeout_s}s")
        time.sleep(0.01)


def scrape_counter(url: str, name: str) -> float:
    status, text = _get(url + "/metrics")
    if status != 200:
        raise RuntimeError(f"{url}/metrics: HTTP {status}")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Measurements


@dataclasses.dataclass
class PolicyRun:
    policy: str
    workload: str
    ttft_p50_ms: float
    throughput_tok_s: float
    completed: int
    failed: int
    hit_rate: float | None
    in_flight_max_over_mean: float | None
    per_replica_in_flight: dict[str, float]
    picks_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)  # the router's own count


async def _sample_in_flight(router_url: str, stop: asyncio.Event, out: dict[str, list[float]]) -> None:
    """Poll the router's per-replica in-flight gauge while the load runs (10 Hz)."""
    import aiohttp  # noqa: PLC0415

    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(router_url + "/metrics") as resp:
                    text = await resp.text()
                for line in text.splitlines():
                    if line.startswith("fleetlm_router_in_flight{"):
                        replica = line.split('replica="', 1)[1].split('"', 1)[0]
                        out.setdefault(replica, []).append(float(line.rsplit(" ", 1)[1]))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)


async def _measure(
    router: Process,
    replicas: Sequence[Process],
    cfg: bench_serve.BenchConfig,
    specs: list[bench_serve.RequestSpec],
    *,
    policy: str,
    workload: str,
) -> PolicyRun:
    queries0 = sum(scrape_counter(r.url, PREFIX_QUERIES) for r in replicas)
    hits0 = sum(scrape_counter(r.url, PREFIX_HITS) for r in replicas)
    stop = asyncio.Event()
    samples: dict[str, list[float]] = {}
    sampler = asyncio.create_task(_sample_in_flight(router.url, stop, samples))
    outcome = await bench_serve.run_target(dataclasses.replace(cfg, url=router.url), specs, label=policy)
    stop.set()
    await sampler
    picks = _picks_by_reason(router.url)
    queries = sum(scrape_counter(r.url, PREFIX_QUERIES) for r in replicas) - queries0
    hits = sum(scrape_counter(r.url, PREFIX_HITS) for r in replicas) - hits0
    ok = [r for r in outcome.results if r.success]
    means = {name: statistics.fmean(v) for name, v in samples.items() if v}
    balance = None
    if means and statistics.fmean(means.values()) > 0:
        balance = max(means.values()) / statistics.fmean(means.values())
    return PolicyRun(
        policy=policy, workload=workload,
        ttft_p50_ms=statistics.median(r.ttft_s for r in ok) * 1e3 if ok else float("nan"),
        throughput_tok_s=sum(r.output_tokens for r in ok) / outcome.duration_s,
        completed=len(ok), failed=len(outcome.results) - len(ok),
        hit_rate=hits / queries if queries else None,
        in_flight_max_over_mean=balance, per_replica_in_flight=means, picks_by_reason=picks,
    )  # fmt: skip


def _picks_by_reason(router_url: str) -> dict[str, int]:
    """`fleetlm_router_picks_total` summed over replicas, by reason (affinity, spill, new_prefix, ...)."""
    status, text = _get(router_url + "/metrics")
    if status != 200:
        raise RuntimeError(f"{router_url}/metrics: HTTP {status}")
    picks: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("fleetlm_router_picks_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            picks[reason] = picks.get(reason, 0) + round(float(line.rsplit(" ", 1)[1]))
    return picks


@contextlib.contextmanager
def _replicas(directory: pathlib.Path, config: dict[str, Any], count: int, tag: str) -> Iterator[list[Process]]:
    started = [start_runtime(directory, config, name=f"{tag}-replica-{i}") for i in range(count)]
    try:
        for proc in started:
            proc.wait_ready()
        yield started
    finally:
        for proc in started:
            proc.stop()


async def _from_zero(directory: pathlib.Path, config: dict[str, Any], cfg: bench_serve.BenchConfig) -> dict[str, float]:
    """A router with no replica; the harness starts one when the router asks (as the operator would)."""
    served_name = str(config["model"]["source"]).removeprefix("builtin:")  # nothing to ask /v1/models at zero
    endpoints = directory / "zero-endpoints.txt"
    write_endpoints(endpoints, [])
    scale_file = directory / "zero-scale.jsonl"
    router = start_router(
        directory,
        endpoints_file=endpoints,
        name="zero-router",
        args=["--scale-file", str(scale_file), "--hold-timeout", "300"],
    )
    replica: Process | None = None
    try:
        router.wait_ready()
        spec = bench_serve.RequestSpec(prompt=list(range(10, 74)), prompt_len=64, output_len=8)
        request = asyncio.create_task(
            bench_serve.run_target(
                dataclasses.replace(cfg, url=router.url, model=served_name, progress=False), [spec], label="from-zero"
            )
        )
        sent = time.monotonic()
        await asyncio.to_thread(wait_scale_request, scale_file)
        asked_s = time.monotonic() - sent
        replica = start_runtime(directory, config, name="zero-replica")
        startup_s = await asyncio.to_thread(replica.wait_ready)
        write_endpoints(endpoints, [replica.url])
        outcome = await request
        result = outcome.results[0]
        if not result.success:
            raise RuntimeError(f"the held request failed: {result.error}")
        return {
            "ask_s": asked_s,
            "startup_s": startup_s,
            "ttft_s": result.ttft_s,
            "overhead_s": result.ttft_s - asked_s - startup_s,
        }
    finally:
        router.stop()
        if replica is not None:
            replica.stop()


# The scraper runs in a process of its own, as an endpoint picker does: measured from the load generator's
# event loop, each scrape would also wait behind that loop's 32 streams, which is the client's delay, not
# the server's.
_POLLER = r"""
import http.client, json, sys, threading, time
host, port, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
conn = http.client.HTTPConnection(host, port, timeout=10)
latencies, running = [], 0.0
while not stop.is_set():
    started = time.perf_counter()
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    latencies.append(time.perf_counter() - started)
    for line in text.splitlines():
        if line.startswith("vllm:num_requests_running{"):
            running = max(running, float(line.rsplit(" ", 1)[1]))
    stop.wait(max(0.0, interval - (time.perf_counter() - started)))
print(json.dumps({"latencies": latencies, "running": running}))
"""


class _MetricsPoller:
    """GET /metrics every `interval_s` (an endpoint picker's default tick) from another process until
    `stop()`, which returns each scrape's latency and the highest `vllm:num_requests_running` seen."""

    def __init__(self, url: str, *, interval_s: float = 0.05) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _POLLER, host, port, str(interval_s)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def stop(self) -> tuple[list[float], float]:
        out, _ = self._proc.communicate(input=b"", timeout=60)
        data = json.loads(out)
        return data["latencies"], data["running"]


def _ms(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


async def _metrics_latency(
    directory: pathlib.Path, cfg: bench_serve.BenchConfig, *, streams: int, model: str, rounds: int
) -> dict[str, Any]:
    """/metrics latency of one replica at 20 Hz: idle, then with `streams` concurrent streams running for
    `rounds` streams each (so the loaded phase is long enough for a p99)."""
    config = runtime_config(model=model, extra={"batching": {"maxBatchSize": streams, "maxBatchTokens": 2048}})
    replica = start_runtime(directory, config, name="metrics-replica")
    try:
        replica.wait_ready()
        idle = _MetricsPoller(replica.url)
        await asyncio.sleep(3.0)
        idle_lat, _ = idle.stop()
        specs = bench_serve.build_dataset(
            bench_serve.DatasetConfig(kind="random", input_len=64, output_len=256), num=streams * rounds, seed=7
        )
        loaded = _MetricsPoller(replica.url)
        outcome = await bench_serve.run_target(
            dataclasses.replace(cfg, url=replica.url, max_concurrency=streams), specs, label="metrics"
        )
        load_lat, running = loaded.stop()
    finally:
        replica.stop()
    return {
        "streams": streams, "idle_p50_ms": _ms(idle_lat, 0.5), "idle_p99_ms": _ms(idle_lat, 0.99),
        "load_p50_ms": _ms(load_lat, 0.5), "load_p99_ms": _ms(load_lat, 0.99), "load_max_ms": _ms(load_lat, 1.0),
        "scrapes": len(load_lat), "max_running": running,
        "completed": sum(r.success for r in outcome.results),
    }  # fmt: skip


async def _run_policy(
    directory: pathlib.Path,
    replicas: Sequence[Process],
    cfg: bench_serve.BenchConfig,
    specs: list[bench_serve.RequestSpec],
    *,
    policy: str,
    tag: str,
    workload: str,
) -> PolicyRun:
    endpoints = directory / f"{tag}.txt"
    write_endpoints(endpoints, [r.url for r in replicas])
    router = start_router(directory, endpoints_file=endpoints, name=f"{tag}-router", args=["--policy", policy])
    try:
        router.wait_ready()
        return await _measure(router, replicas, cfg, specs, policy=policy, workload=workload)
    finally:
        router.stop()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    directory = pathlib.Path(tempfile.mkdtemp(prefix="bench-router-"))
    config = runtime_config(
        model=args.model,
        max_model_len=args.prefix_len + args.question_len + args.output_len + 64,
        prefix_cache_tokens=args.prefix_cache_tokens,
    )
    cfg = bench_serve.BenchConfig(
        url="", max_concurrency=args.concurrency, progress=False, seed=args.seed, timeout_s=600
    )
    shared = bench_serve.build_dataset(
        bench_serve.DatasetConfig(kind="shared-prefix", input_len=args.question_len, output_len=args.output_len,
                                  prefix_len=args.prefix_len, num_prefixes=args.num_prefixes),
        num=args.num_prompts, seed=args.seed)  # fmt: skip
    uniform = bench_serve.build_dataset(
        bench_serve.DatasetConfig(kind="random", input_len=args.uniform_input_len, output_len=args.output_len,
                                  input_dist="uniform", output_dist="uniform"),
        num=args.num_prompts, seed=args.seed + 1)  # fmt: skip
    warm_up = bench_serve.build_dataset(
        bench_serve.DatasetConfig(kind="random", input_len=args.uniform_input_len, output_len=args.output_len),
        num=args.concurrency,
        seed=args.seed + 2,
    )
    results: list[PolicyRun] = []
    policies = ("prefix-affinity", "round-robin")
    out: dict[str, Any] = {}
    if args.section in ("all", "metrics"):
        out["metrics_latency"] = await _metrics_latency(
            directory, cfg, streams=args.metrics_streams, model=args.model, rounds=args.metrics_rounds
        )
        print(report({"metrics_latency": out["metrics_latency"]}), flush=True)
    for round_ in range(args.rounds if args.section in ("all", "routing") else 0):
        order = policies if round_ % 2 == 0 else policies[::-1]
        # Shared prefixes: fresh replicas per policy, so neither inherits the other's warm caches.
        for policy in order if args.workload in ("all", "shared-prefix") else ():
            tag = f"shared-{policy}-{round_}"
            with _replicas(directory, config, args.replicas, tag) as replicas:
                results.append(
                    await _run_policy(
                        directory, replicas, cfg, shared, policy=policy, tag=tag, workload="shared-prefix"
                    )
                )
        # Uniform prompts share nothing: one replica set serves both policies.
        if args.workload == "shared-prefix":
            continue
        with _replicas(directory, config, args.replicas, f"uniform-{round_}") as replicas:
            # Both policies share these replicas: warm them first, or whichever runs first pays their start.
            await asyncio.gather(
                *(
                    bench_serve.run_target(dataclasses.replace(cfg, url=r.url), warm_up, label="warm-up")
                    for r in replicas
                )
            )
            for policy in order:
                results.append(
                    await _run_policy(
                        directory,
                        replicas,
                        cfg,
                        uniform,
                        policy=policy,
                        tag=f"uniform-{policy}-{round_}",
                        workload="uniform",
                    )
                )
    if results:
        out["runs"] = [dataclasses.asdict(r) for r in results]
        print("\n".join(_routing_report(out)), flush=True)  # printed as soon as known; from zero comes last
    if args.section in ("all", "zero"):
        out["from_zero"] = await _from_zero(directory, runtime_config(model=args.model), cfg)
    shutil.rmtree(directory, ignore_errors=True)
    return out


def _mean(runs: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in runs if r[key] is not None]
    return statistics.fmean(values) if values else float("nan")


def report(data: dict[str, Any]) -> str:
    lines = []
    if m := data.get("metrics_latency"):
        lines.append(
            f"/metrics at 20 Hz, one replica: idle p50 {m['idle_p50_ms']:.1f} ms p99 {m['idle_p99_ms']:.1f} ms; "
            f"{m['streams']} streams p50 {m['load_p50_ms']:.1f} ms p99 {m['load_p99_ms']:.1f} ms max "
            f"{m['load_max_ms']:.1f} ms over {m['scrapes']} scrapes (vllm:num_requests_running up to "
            f"{m['max_running']:.0f}; {m['completed']} streams completed); bar: under the 50 ms tick"
        )
    if "runs" in data:
        lines.extend(_routing_report(data))
    if z := data.get("from_zero"):
        lines.append(
            f"from zero: TTFT {z['ttft_s']:.2f}s = router asked after {z['ask_s']:.3f}s + replica start-up "
            f"{z['startup_s']:.2f}s + {z['overhead_s']:.3f}s (bar < 1 s)"
        )
    return "\n".join(lines)


def _routing_report(data: dict[str, Any]) -> list[str]:
    lines = []
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in data["runs"]:
        by.setdefault((r["workload"], r["policy"]), []).append(r)
    lines.append(
        "workload        policy            TTFT p50 ms   tok/s    hit rate   busiest/mean in-flight   ok/failed"
        "   picks by reason"
    )
    for (workload, policy), runs in by.items():
        reasons: dict[str, int] = {}
        for r in runs:
            for reason, count in r.get("picks_by_reason", {}).items():
                reasons[reason] = reasons.get(reason, 0) + count
        lines.append(
            f"{workload:<15} {policy:<17} {_mean(runs, 'ttft_p50_ms'):10.1f} {_mean(runs, 'throughput_tok_s'):8.1f}"
            f"   {_mean(runs, 'hit_rate'):8.3f}   {_mean(runs, 'in_flight_max_over_mean'):12.2f}"
            f"             {sum(r['completed'] for r in runs)}/{sum(r['failed'] for r in runs):<9}"
            f"   {' '.join(f'{k}={v}' for k, v in sorted(reasons.items()))}"
        )

    def ratio(workload: str, key: str) -> float:
        return _mean(by[(workload, "round-robin")], key) / _mean(by[(workload, "prefix-affinity")], key)

    if ("shared-prefix", "round-robin") in by:
        lines.append(
            f"shared-prefix: TTFT p50 round-robin / affinity = {ratio('shared-prefix', 'ttft_p50_ms'):.2f}x"
            f" (bar >= 2x); hit rate {_mean(by[('shared-prefix', 'prefix-affinity')], 'hit_rate'):.3f} vs "
            f"{_mean(by[('shared-prefix', 'round-robin')], 'hit_rate'):.3f}"
        )
    if ("uniform", "round-robin") in by:
        lines.append(
            f"uniform: throughput affinity / round-robin = {1 / ratio('uniform', 'throughput_tok_s'):.2f}"
            f" (bar >= 1, noise aside); busiest/mean in-flight with affinity "
            f"{_mean(by[('uniform', 'prefix-affinity')], 'in_flight_max_over_mean'):.2f} (bar <= 1.25)"
        )
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fleetlm-dev bench router", description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        default="builtin:small",
        help="default builtin:small: on builtin:tiny a 512-token prefill costs about nothing (TTFT is 30-90 ms of "
        "fixed overhead), so a prefix hit has nothing to save and the shared-prefix bar measures noise",
    )
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--num-prompts", type=int, default=160)
    p.add_argument("--concurrency", type=int, default=12)
    p.add_argument("--num-prefixes", type=int, default=8)
    p.add_argument("--prefix-len", type=int, default=512)
    p.add_argument("--question-len", type=int, default=16)
    p.add_argument("--uniform-input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument(
        "--prefix-cache-tokens",
        type=int,
        default=1600,
        help="per replica; default fits 3 of the 8 prefixes of 512 tokens, as a bounded KV cache would",
    )
    p.add_argument("--rounds", type=int, default=1, help="A/B rounds per workload (alternating order)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--workload",
        choices=("all", "shared-prefix", "uniform"),
        default="all",
        help="routing section: which workloads to run",
    )
    p.add_argument("--section", choices=("all", "routing", "zero", "metrics"), default="all")
    p.add_argument("--metrics-streams", type=int, default=32, help="streams while /metrics latency is measured")
    p.add_argument("--metrics-rounds", type=int, default=8, help="requests per stream while it is measured")
    p.add_argument("--json", default=None, help="also write the figures here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data = asyncio.run(run(args))
    print(report(data))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
