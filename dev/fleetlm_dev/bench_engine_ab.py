"""`fleetlm-dev bench engine --against REV`: engine tok/s of this tree and of another revision, in one run.

Timings on a shared machine drift by more than the differences worth measuring, so the two engines are
measured interleaved: one worker process per tree (this tree, and `REV` checked out with `git worktree
add` in a temporary directory, or any directory given with `--against-path`), each with its model loaded
and its engine warm, then for every concurrency level the slices alternate A, B, B, A, ... and the ratio
is that of the medians. Each level also reports tokens per CPU-second of the worker process, which the
load of other processes on a shared machine skews far less than wall time. The workers run this tree's
measuring code (`bench_engine.run_concurrency`, the same closed loop as the main benchmark) on the other
tree's `fleetlm_runtime` (PYTHONPATH), so only the engine differs. Nothing is asserted; the figures are
printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import IO, Any

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]  # this tree: dev/fleetlm_dev/bench_engine_ab.py
CONCURRENCY = (1, 8, 32, 64)


# ------------------------------------------------------------------------------------------------------
# The worker: one engine, measurements on request (a line "concurrency num_requests" on stdin)


async def _serve(args: argparse.Namespace) -> None:
    import torch  # noqa: PLC0415  (the driver process never needs torch)

    from fleetlm_dev import bench_engine  # noqa: PLC0415
    from fleetlm_runtime.engine import async_engine, core  # noqa: PLC0415
    from fleetlm_runtime.engine import config as config_mod  # noqa: PLC0415
    from fleetlm_runtime.models import loader  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    loaded = loader.load(args.model, dtype="float32")
    workload = bench_engine.make_workload(
        256, vocab_size=loaded.vocab_size, seed=args.seed, prompt_len=(16, 128), output_len=(32, 128)
    )
    collector = bench_engine.StatsCollector()
    engine_core = core.EngineCore(
        config_mod.EngineConfig(max_batch_size=max(CONCURRENCY), max_batch_tokens=args.max_batch_tokens),
        loaded=loaded,
    )
    engine = async_engine.AsyncEngine(engine_core, stats_callback=collector)
    engine.start()
    # A second core, stepped directly by this thread, for the per-step CPU cost (see `_step_cost`).
    step_core = core.EngineCore(
        config_mod.EngineConfig(max_batch_size=max(CONCURRENCY), max_batch_tokens=4096), loaded=loaded
    )
    try:
        await bench_engine.run_concurrency(engine, collector, workload, concurrency=8, num_requests=8)  # warm-up
        info = engine_core.info
        print(
            json.dumps(
                {"ready": True, "forward": engine_core.runner.forward_name, "kv_tokens": info.kv_capacity_tokens}
            ),
            flush=True,
        )
        while line := await asyncio.to_thread(sys.stdin.readline):
            if line.startswith("step"):
                print(json.dumps({"step_cpu_ms": _step_cost(step_core, workload, int(line.split()[1]))}), flush=True)
                continue
            concurrency, num_requests = (int(x) for x in line.split())
            cpu_started = time.process_time()
            run = await bench_engine.run_concurrency(
                engine, collector, workload, concurrency=concurrency, num_requests=num_requests
            )
            # Tokens per CPU-second of this process (engine thread and event loop): what the engine costs,
            # whatever share of the machine other processes took meanwhile.
            run["tokens_per_cpu_s"] = run["output_tokens"] / (time.process_time() - cpu_started)
            print(json.dumps(run), flush=True)
    finally:
        await engine.shutdown()
        step_core.close()


def _step_cost(engine_core: Any, workload: Any, batch: int, steps: int = 40) -> float:
    """CPU time (this thread's) of one all-decode step at `batch` sequences, in ms: the mean of the fastest
    quarter of `steps` steps. Thread CPU time and the fastest steps are what other processes on a shared
    machine disturb least; the step is the engine's whole per-token work (schedule, forward, sample, update)."""
    from fleetlm_runtime.engine import request as request_mod  # noqa: PLC0415

    ids = [f"s{i}" for i in range(batch)]
    for i, req_id in enumerate(ids):
        params = request_mod.SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True, detokenize=False)
        engine_core.add_request(
            engine_core.make_request(req_id=req_id, prompt_token_ids=workload.prompts[i], sampling_params=params)
        )
    while any(len(r.output_token_ids) == 0 for r in engine_core.scheduler.requests.values()):
        engine_core.step()  # the prefills
    costs = []
    for _ in range(steps):
        started = time.thread_time()
        engine_core.step()
        costs.append(time.thread_time() - started)
    engine_core.abort_requests(ids)
    costs.sort()
    return 1e3 * statistics.fmean(costs[: max(1, steps // 4)])


# ------------------------------------------------------------------------------------------------------
# The driver


class Worker:
    def __init__(self, *, name: str, tree: pathlib.Path, args: argparse.Namespace, spec: str) -> None:
        self.name = name
        self.tree = tree
        self.revision = _describe(tree)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(tree / "runtime"), str(REPO_ROOT / "dev")])
        command = [
            sys.executable,
            "-m",
            "fleetlm_dev.bench_engine_ab",
            "--worker",
            "--model",
            spec,
            "--threads",
            str(args.threads),
            "--max-batch-tokens",
            str(args.max_batch_tokens),
            "--seed",
            str(args.seed),
        ]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, cwd=tree
        )
        self.ready = self._read()

    def _read(self) -> dict[str, Any]:
        stdout: IO[str] | None = self.process.stdout
        assert stdout is not None
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker ({self.tree}) exited with {self.process.wait()}")
        return json.loads(line)  # type: ignore[no-any-return]

    def measure(self, concurrency: int, num_requests: int) -> dict[str, Any]:
        return self.command(f"{concurrency} {num_requests}")

    def command(self, line: str) -> dict[str, Any]:
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write(line + "\n")
        stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _describe(tree: pathlib.Path) -> str:
    def git(*argv: str) -> str:
        result = subprocess.run(["git", "-C", str(tree), *argv], capture_output=True, text=True, check=False)
        return result.stdout.strip()

    revision = git("rev-parse", "--short", "HEAD") or "?"
    return revision + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


@contextlib.contextmanager
def checkout(revision: str) -> Iterator[pathlib.Path]:
    """`revision` in a temporary git worktree, removed afterwards."""
    directory = pathlib.Path(tempfile.mkdtemp(prefix="fleetlm-bench-against-"))
    subprocess.run(
        ["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", "--quiet", str(directory), revision],
        check=True,
    )
    try:
        yield directory
    finally:
        subprocess.run(
            ["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", str(directory)],
            check=False,
        )


def compare(spec: str, against: pathlib.Path, args: argparse.Namespace) -> dict[str, Any]:
    slices = 2 if args.quick else 3
    workers = [
        Worker(name="against", tree=against, args=args, spec=spec),
        Worker(name="current", tree=REPO_ROOT, args=args, spec=spec),
    ]
    try:
        levels = []
        for concurrency in CONCURRENCY:
            num = max(8 if args.quick else 16, (2 if args.quick else 4) * concurrency)
            runs: dict[str, list[float]] = {w.name: [] for w in workers}
            cpu: dict[str, list[float]] = {w.name: [] for w in workers}
            for index in range(slices):
                for worker in workers if index % 2 == 0 else reversed(workers):
                    run = worker.measure(concurrency, num)
                    runs[worker.name].append(run["tokens_per_s"])
                    cpu[worker.name].append(run["tokens_per_cpu_s"])
            against_tps, current_tps = statistics.median(runs["against"]), statistics.median(runs["current"])
            against_cpu, current_cpu = statistics.median(cpu["against"]), statistics.median(cpu["current"])
            levels.append(
                {
                    "concurrency": concurrency,
                    "requests": num,
                    "against_tokens_per_s": against_tps,
                    "current_tokens_per_s": current_tps,
                    "ratio": current_tps / against_tps,
                    "against_tokens_per_cpu_s": against_cpu,
                    "current_tokens_per_cpu_s": current_cpu,
                    "cpu_ratio": current_cpu / against_cpu,
                    "slices": {name: [round(x) for x in values] for name, values in runs.items()},
                }
            )
        return {
            "model": spec,
            "against": {"tree": str(against), "revision": workers[0].revision, **workers[0].ready},
            "current": {"tree": str(REPO_ROOT), "revision": workers[1].revision, **workers[1].ready},
            "slices": slices,
            "levels": levels,
            "step_cost": _compare_steps(workers, rounds=8 if args.quick else 16),
        }
    finally:
        for worker in workers:
            worker.close()


def _compare_steps(workers: list[Worker], *, rounds: int) -> list[dict[str, Any]]:
    found = []
    for batch in (8, 32, 64):
        costs: dict[str, list[float]] = {w.name: [] for w in workers}
        for index in range(rounds):
            for worker in workers if index % 2 == 0 else reversed(workers):
                costs[worker.name].append(worker.command(f"step {batch}")["step_cpu_ms"])
        against, current = statistics.median(costs["against"]), statistics.median(costs["current"])
        found.append({"batch": batch, "against_ms": against, "current_ms": current, "ratio": current / against})
    return found


def render(results: list[dict[str, Any]], threads: int) -> str:
    lines = [f"Engine tok/s, this tree against another revision: interleaved in one run, {threads} torch thread(s)"]
    for result in results:
        a, c = result["against"], result["current"]
        lines.append("")
        lines.append(
            f"{result['model']}: against {a['revision']} ({a['forward']}, KV {a['kv_tokens']} tokens) vs current "
            f"{c['revision']} ({c['forward']}, KV {c['kv_tokens']} tokens); median of {result['slices']} slices"
        )
        lines.append(
            "  concurrent  requests   against tok/s   current tok/s   ratio   | against tok/cpu-s   current tok/cpu-s"
            "   ratio   | wall slices (a | c)"
        )
        for level in result["levels"]:
            sl = level["slices"]
            lines.append(
                f"  {level['concurrency']:>10}  {level['requests']:>8}   {level['against_tokens_per_s']:>13.0f}   "
                f"{level['current_tokens_per_s']:>13.0f}   {level['ratio']:>5.3f}   | "
                f"{level['against_tokens_per_cpu_s']:>17.0f}   {level['current_tokens_per_cpu_s']:>17.0f}   "
                f"{level['cpu_ratio']:>5.3f}   | {','.join(map(str, sl['against']))} | "
                f"{','.join(map(str, sl['current']))}"
            )
        lines.append(
            "  (tok/cpu-s: output tokens per CPU-second of the engine's process, which other load on a shared "
            "machine skews less)"
        )
        lines.append("  all-decode step, thread CPU ms (fastest quarter of 40 steps, median of the rounds):")
        for cost in result["step_cost"]:
            lines.append(
                f"    batch {cost['batch']:>2}: against {cost['against_ms']:.3f} ms, current {cost['current_ms']:.3f} "
                f"ms, current/against {cost['ratio']:.3f} (tok/s ratio {1 / cost['ratio']:.3f})"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace, specs: Sequence[str]) -> int:
    if args.against_path:
        context: contextlib.AbstractContextManager[pathlib.Path] = contextlib.nullcontext(
            pathlib.Path(args.against_path).resolve()
        )
    else:
        context = checkout(args.against)
    with context as against:
        results = [compare(spec, against, args) for spec in specs]
    print(json.dumps(results, indent=2) if args.json else render(results, args.threads))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleetlm_dev.bench_engine_ab", description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-batch-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    asyncio.run(_serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
