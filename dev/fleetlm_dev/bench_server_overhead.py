"""Figure: the HTTP server's output tokens/s at N concurrent streams vs the engine's own, same workload.

Not a test (pytest does not collect it): a script that prints a figure, as DESIGN.md asks of benchmarks.
For each model it runs, in one invocation and interleaved so machine noise hits all alike:

* engine: `AsyncEngine` in this process with its core in its own process (the server's engine layout),
  N closed-loop clients (each sends its next request when the previous one ends), as `fleetlm-dev bench
  engine` drives it. The baseline of the figure: what the server adds to it is HTTP and streaming.
* server: the real `fleetlm-runtime` process with the same engine settings, driven by
  `fleetlm_dev.bench_serve` at the same fixed concurrency over HTTP with streaming (SSE) and usage.
* for reference, `thread`: the same AsyncEngine with the core on a worker thread (`bench engine`'s
  default layout), and `core`: the bare `EngineCore` stepped in a plain loop with N requests kept in
  flight, no asyncio, no second thread or process at all (an upper bound no server reaches).

All see the same requests (token-id prompts, greedy, EOS ignored, so all produce exactly the same number
of tokens, and all detokenize) and the same torch thread count. The ratio server/engine is the figure;
server/core is printed beside it. The client shares the machine with the server, so its own parsing cost
is inside the ratios (a pessimistic bound: on 2 cores the core, the server and the client compete).

    fleetlm-dev bench server-overhead [--models builtin:tiny,builtin:small] [--requests N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from typing import Any

import yaml

from fleetlm_dev import bench_serve, testing
from fleetlm_runtime import config as config_mod
from fleetlm_runtime.engine import async_engine
from fleetlm_runtime.engine import config as engine_config
from fleetlm_runtime.engine import core as core_mod
from fleetlm_runtime.engine import request as request_mod


def _workload(num: int, seed: int) -> list[bench_serve.RequestSpec]:
    ds = bench_serve.DatasetConfig(
        input_len=72, output_len=80, input_dist="uniform", output_dist="uniform", range_ratio=0.75
    )  # prompts ~18-126 tokens, outputs ~20-140 tokens: the engine benchmark's shape
    return bench_serve.build_dataset(ds, num=num, seed=seed)


def _token_ids(spec: bench_serve.RequestSpec) -> list[int]:
    """The engine takes token ids; `_workload`'s dataset (prompt_format token-ids) gives only those."""
    if isinstance(spec.prompt, str):
        raise TypeError("bench_server_overhead needs token-id prompts, got a text prompt")
    return list(spec.prompt)


def core_run(core: core_mod.EngineCore, specs: list[bench_serve.RequestSpec], concurrency: int) -> dict[str, float]:
    queue = list(reversed(specs))
    tokens = 0

    def add() -> None:
        spec = queue.pop()
        params = request_mod.SamplingParams(max_tokens=spec.output_len, temperature=0.0, ignore_eos=True)
        core.add_request(
            core.make_request(req_id=uuid.uuid4().hex, prompt_token_ids=_token_ids(spec), sampling_params=params)
        )

    started = time.perf_counter()
    for _ in range(min(concurrency, len(queue))):
        add()
    while core.has_unfinished_requests():
        step_outputs, _ = core.step()
        for out in step_outputs:
            tokens += len(out.new_token_ids)
            if out.finished and queue:
                add()
    elapsed = time.perf_counter() - started
    return {"output_tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


async def engine_run(
    engine: async_engine.AsyncEngine, specs: list[bench_serve.RequestSpec], concurrency: int
) -> dict[str, float]:
    queue = list(reversed(specs))
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        while queue:
            spec = queue.pop()
            params = request_mod.SamplingParams(max_tokens=spec.output_len, temperature=0.0, ignore_eos=True)
            async for out in engine.submit(_token_ids(spec), params):
                tokens += len(out.new_token_ids)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"output_tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


class _Server:
    def __init__(
        self, model: str, *, threads: int, max_batch_size: int, max_batch_tokens: int, stream_interval: int
    ) -> None:
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="fleetlm-overhead-"))
        self.port = testing.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = config_mod.parse_config(
            {
                "model": {"source": model, "dtype": "float32"},
                "batching": {"maxBatchSize": max_batch_size, "maxBatchTokens": max_batch_tokens, "maxQueueLen": 4096},
                "server": {"streamIntervalTokens": stream_interval},
                # Rounds repeat the same greedy requests: the server must compute them, as the engine does.
                "caching": {"responseCache": {"enabled": False}},
            }
        )
        (self.dir / "runtime.yaml").write_text(yaml.safe_dump(config_mod.dump_config(cfg)))
        self.log = (self.dir / "runtime.log").open("wb")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        script = pathlib.Path(sys.executable).with_name("fleetlm-runtime")
        cmd = [str(script)] if script.exists() else [sys.executable, "-m", "fleetlm_runtime"]
        self.proc = subprocess.Popen(
            [*cmd, "--config", str(self.dir / "runtime.yaml"), "--port", str(self.port), "--log-level", "WARNING"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fleetlm-runtime exited: see {self.dir / 'runtime.log'}")
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("fleetlm-runtime did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def server_run(url: str, specs: list[bench_serve.RequestSpec], concurrency: int) -> dict[str, Any]:
    cfg = bench_serve.BenchConfig(url=url, max_concurrency=concurrency, progress=False, temperature=0.0)
    outcome = await bench_serve.run_target(cfg, specs)
    summary = bench_serve.summarize(outcome.results, outcome.duration_s, bench_serve.SLO())
    return {
        "output_tokens": summary["total_output_tokens"],
        "seconds": summary["duration_s"],
        "tokens_per_s": summary["output_throughput"],
        "failed": summary["failed"],
        "ttft_p50_ms": summary["ttft_ms"]["p50"],
        "itl_p50_ms": summary["itl_ms"]["p50"],
    }


async def measure(model: str, args: argparse.Namespace) -> dict[str, Any]:
    specs = _workload(args.requests, args.seed)
    warm = [dataclasses.replace(s, output_len=8) for s in _workload(args.concurrency, args.seed + 1)]
    limits = {"max_batch_size": args.max_batch_size, "max_batch_tokens": args.max_batch_tokens}
    cfg = engine_config.EngineConfig(model=model, dtype="float32", num_threads=args.threads, **limits)
    core = core_mod.EngineCore(cfg)
    engine = await async_engine.AsyncEngine.create(cfg, executor_kind="process")
    thread_engine = await async_engine.AsyncEngine.create(cfg, executor_kind="thread")
    server = _Server(model, threads=args.threads, stream_interval=args.stream_interval, **limits)
    core_runs: list[dict[str, float]] = []
    engine_runs: list[dict[str, float]] = []
    thread_runs: list[dict[str, float]] = []
    server_runs: list[dict[str, Any]] = []
    try:
        await asyncio.to_thread(server.wait_ready)
        core_run(core, warm, args.concurrency)
        await engine_run(engine, warm, args.concurrency)
        await engine_run(thread_engine, warm, args.concurrency)
        await server_run(server.url, warm, args.concurrency)
        for _ in range(args.rounds):  # interleave, so drift in machine load hits all alike
            engine_runs.append(await engine_run(engine, specs, args.concurrency))
            server_runs.append(await server_run(server.url, specs, args.concurrency))
            thread_runs.append(await engine_run(thread_engine, specs, args.concurrency))
            core_runs.append(core_run(core, specs, args.concurrency))
    finally:
        server.stop()
        await engine.shutdown()
        await thread_engine.shutdown()
        core.close()
    core_tps = statistics.median(r["tokens_per_s"] for r in core_runs)
    engine_tps = statistics.median(r["tokens_per_s"] for r in engine_runs)
    thread_tps = statistics.median(r["tokens_per_s"] for r in thread_runs)
    server_tps = statistics.median(r["tokens_per_s"] for r in server_runs)
    return {
        "model": model,
        "concurrency": args.concurrency,
        "requests_per_round": len(specs),
        "rounds": args.rounds,
        "torch_threads": args.threads,
        "stream_interval_tokens": args.stream_interval,
        "engine_tokens_per_s": engine_tps,
        "server_tokens_per_s": server_tps,
        "server_over_engine": server_tps / engine_tps,
        "thread_engine_tokens_per_s": thread_tps,
        "core_tokens_per_s": core_tps,
        "server_over_core": server_tps / core_tps,
        "engine_runs": engine_runs,
        "thread_runs": thread_runs,
        "core_runs": core_runs,
        "server_runs": server_runs,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="builtin:tiny", help="comma-separated, e.g. builtin:tiny,builtin:small")
    p.add_argument("--concurrency", type=int, default=32)
    # The tiny model streams ~20k tokens/s here: 512 requests make runs of ~2 s, long enough to average
    # out scheduler noise (use fewer with builtin:small, ~300 tokens/s).
    p.add_argument("--requests", type=int, default=512, help="requests per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads in both (the engine benchmark's default)")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-batch-tokens", type=int, default=512)
    p.add_argument("--stream-interval", type=int, default=1, help="the server's tokens per SSE chunk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    import torch  # noqa: PLC0415  (only the benchmark run needs it, not --help)

    torch.set_num_threads(args.threads)
    results = [asyncio.run(measure(model, args)) for model in args.models.split(",")]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(
        f"server vs engine, {args.concurrency} concurrent streams, torch threads {args.threads}, {os.cpu_count()} CPUs"
    )
    print(
        f"{'model':<16}{'engine tok/s':>13}{'server tok/s':>13}{'server/engine':>14}"
        f"{'thread tok/s':>13}{'core tok/s':>11}{'server/core':>12}"
    )
    for r in results:
        print(
            f"{r['model']:<16}{r['engine_tokens_per_s']:>13.0f}{r['server_tokens_per_s']:>13.0f}"
            f"{r['server_over_engine']:>14.1%}{r['thread_engine_tokens_per_s']:>13.0f}"
            f"{r['core_tokens_per_s']:>11.0f}{r['server_over_core']:>12.1%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
