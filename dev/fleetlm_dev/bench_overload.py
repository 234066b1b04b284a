"""`fleetlm-dev bench overload`: a real `fleetlm-runtime` process under a load that needs 3x its KV pool.

The server runs as in production (the engine core in a child process) on the built-in tiny model, with a
KV pool sized to a third of what the load holds at its worst: `concurrency` closed-loop clients, each
request's prompt plus its output at most, averaged over the workload. Every request is greedy with EOS
ignored, sent as token ids through `/v1/completions`. Throughout the run:

* `/ready` is polled every 100 ms: every answer must be 200 (a 503 or a failed poll counts as a flip);
* the resident memory (RSS) of the server process and of its engine child is sampled with every poll,
  and the growth after warm-up (the first 10% of requests: allocator and caches settle) is reported as
  (last sample - sample at warm-up) / sample at warm-up, per process, with the largest sample after
  warm-up beside it;
* when the load is done, `generate(do_sample=False)` on a fresh copy of the model checks a sample of the
  requests (or all of them) against the served text: the reference tokens go through the server's own
  incremental detokenizer, so equal tokens give equal text.

It prints the completed count, errors, /ready polls and the memory curve, and writes the curve as text
and as a PNG under `$FLEETLM_CACHE/bench/overload/`. `run()` returns the figures and asserts nothing; the
suite's test (tests/dev/test_overload_through_the_server.py) runs a 200-request version and asserts them,
and `--check` makes this command exit 1 when a property does not hold.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import pathlib
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from typing import Any, TypedDict

from fleetlm_dev import paths, testing

READY_INTERVAL_S = 0.1
WARMUP_FRACTION = 0.10
MAX_GROWTH_PCT = 2.0
MAX_MODEL_LEN = 512


class _ReadyPolls(TypedDict):
    polls: int
    not_ready: int
    first_failures: list[str]


@dataclasses.dataclass(frozen=True, slots=True)
class Spec:
    requests: int = 2000
    concurrency: int = 32
    prompt_len: tuple[int, int] = (16, 96)
    output_len: tuple[int, int] = (16, 64)
    load_factor: float = 3.0  # the load's worst case over the pool
    checks: int = 100  # greedy checks against generate(), spread over the run; 0 = every request
    model: str = "builtin:tiny"
    seed: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]


def make_workload(spec: Spec, vocab_size: int) -> Workload:
    rng = random.Random(spec.seed)
    prompts = [[rng.randrange(vocab_size) for _ in range(rng.randint(*spec.prompt_len))] for _ in range(spec.requests)]
    return Workload(prompts, [rng.randint(*spec.output_len) for _ in range(spec.requests)])


def pool_tokens_for(workload: Workload, concurrency: int, load_factor: float) -> tuple[int, int]:
    """(worst-case tokens the running batch would hold, the pool: that over `load_factor`)."""
    mean = statistics.fmean(len(p) + m for p, m in zip(workload.prompts, workload.max_tokens, strict=True))
    worst = int(concurrency * mean)
    return worst, int(worst / load_factor)


def growth_pct(samples: Sequence[tuple[float, int, int]], warm_done: int) -> tuple[float, float, int]:
    """(growth of the last sample over the first at or after `warm_done` completions, in %; the largest
    sample after warm-up over it, in %; that warm-up sample in bytes). Samples: (t, completed, rss)."""
    warm = next((s for s in samples if s[1] >= warm_done), samples[-1])[2]
    after = [s[2] for s in samples if s[1] >= warm_done]
    return 100.0 * (samples[-1][2] - warm) / warm, 100.0 * (max(after) - warm) / warm, warm


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _engine_child(server_pid: int) -> int:
    """The child that holds the model (it maps libtorch); multiprocessing's resource tracker does not."""
    for child in testing.children_of(server_pid):
        try:
            if "libtorch" in pathlib.Path(f"/proc/{child}/maps").read_text():
                return child
        except OSError:
            continue
    raise RuntimeError(f"no engine child (a process mapping libtorch) under the server {server_pid}")


class Server:
    """`python -m fleetlm_runtime` on a free loopback port, stopped by the PID this started."""

    def __init__(self, directory: pathlib.Path, config_data: dict[str, Any]) -> None:
        import yaml  # noqa: PLC0415

        from fleetlm_runtime import config as config_mod  # noqa: PLC0415  (pydantic only, no torch)

        config_path = directory / "runtime.yaml"
        config_path.write_text(yaml.safe_dump(config_mod.dump_config(config_mod.parse_config(config_data))))
        self.port = testing.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = directory / "runtime.log"
        self._log = self.log_path.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        command = [sys.executable, "-m", "fleetlm_runtime", "--config", str(config_path), "--port", str(self.port)]
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fleetlm-runtime exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=1.0) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"fleetlm-runtime not ready after {timeout_s:.0f} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        code = testing.stop_process(self.proc, timeout_s=20)
        self._log.close()
        return code


# Long on purpose: the clients, the /ready poller and the RSS sampler are closures over one set of counters
# (what they saw is one record of one run); apart, they would pass that state around for no gain.
async def _drive(  # noqa: PLR0915
    server: Server, workload: Workload, spec: Spec, pids: dict[str, int], keep: set[int]
) -> dict[str, Any]:
    """The load, the /ready poller and the RSS sampler together; what they saw."""
    import aiohttp  # noqa: PLC0415

    texts: dict[int, str] = {}
    errors: list[str] = []
    completed = 0
    ready: _ReadyPolls = {"polls": 0, "not_ready": 0, "first_failures": []}
    samples: dict[str, list[tuple[float, int, int]]] = {name: [] for name in pids}
    queue = list(range(spec.requests))[::-1]
    done = asyncio.Event()
    started = time.monotonic()

    def sample() -> None:
        now = time.monotonic() - started
        for name, pid in pids.items():
            samples[name].append((now, completed, _rss(pid)))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async with session.get(server.url + "/v1/models") as resp:
            model_name = (await resp.json())["data"][0]["id"]

        async def poll_ready() -> None:
            while not done.is_set():
                try:
                    async with session.get(server.url + "/ready", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                        ok = resp.status == 200
                        why = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                except (aiohttp.ClientError, TimeoutError) as error:
                    ok, why = False, f"{type(error).__name__}: {error}"
                ready["polls"] += 1
                if not ok:
                    ready["not_ready"] += 1
                    if len(ready["first_failures"]) < 3:
                        ready["first_failures"].append(f"t={time.monotonic() - started:.1f}s {why}")
                sample()
                await asyncio.sleep(READY_INTERVAL_S)

        async def client() -> None:
            nonlocal completed
            while queue:
                i = queue.pop()
                body = {
                    "model": model_name,
                    "prompt": workload.prompts[i],
                    "max_tokens": workload.max_tokens[i],
                    "temperature": 0.0,
                    "ignore_eos": True,
                }
                try:
                    async with session.post(server.url + "/v1/completions", json=body) as resp:
                        answer = await resp.json()
                        if resp.status != 200:
                            errors.append(f"request {i}: HTTP {resp.status} {json.dumps(answer)[:200]}")
                            continue
                except (aiohttp.ClientError, TimeoutError, ValueError) as error:
                    errors.append(f"request {i}: {type(error).__name__}: {error}")
                    continue
                got = answer["usage"]["completion_tokens"]
                if got != workload.max_tokens[i]:
                    errors.append(f"request {i}: {got} tokens, expected {workload.max_tokens[i]}")
                    continue
                completed += 1
                if i in keep:
                    texts[i] = answer["choices"][0]["text"]

        poller = asyncio.create_task(poll_ready())
        try:
            await asyncio.gather(*(client() for _ in range(spec.concurrency)))
        finally:
            elapsed = time.monotonic() - started
            done.set()
            await poller
        sample()  # after the last request: the end of the curve
    return {
        "texts": texts,
        "errors": errors,
        "completed": completed,
        "ready": ready,
        "samples": samples,
        "seconds": elapsed,
    }


def _references(spec: Spec, workload: Workload, indices: Sequence[int]) -> tuple[dict[int, str], float]:
    """generate(do_sample=False) alone on each checked request, EOS off, decoded as the server decodes."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    from fleetlm_runtime.engine import detokenizer  # noqa: PLC0415
    from fleetlm_runtime.models import builtin  # noqa: PLC0415

    started = time.monotonic()
    tokenizer: transformers.PreTrainedTokenizerBase
    if builtin.is_builtin(spec.model):
        model, tokenizer = builtin.build(spec.model.removeprefix(builtin.BUILTIN_PREFIX))
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            spec.model, dtype=torch.float32, local_files_only=True
        ).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec.model, local_files_only=True)
    model.generation_config.eos_token_id = None  # like ignore_eos: exactly max_tokens each
    texts = {}
    with torch.inference_mode():
        for i in indices:
            ids = torch.tensor([workload.prompts[i]])
            out = model.generate(  # type: ignore[operator]  # PreTrainedModel's type lacks generate(): GenerationMixin's
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=workload.max_tokens[i],
                min_new_tokens=workload.max_tokens[i],
                pad_token_id=0,
            )
            # The server's own incremental decoding (primed with the prompt's tail, special tokens off):
            # random prompts can end inside a UTF-8 sequence that the first output tokens complete, which
            # a decode of the output alone would render differently although the tokens are equal.
            detok = detokenizer.IncrementalDetokenizer(tokenizer, prompt_token_ids=workload.prompts[i])
            tokens = out[0, ids.shape[1] :].tolist()
            texts[i] = "".join(detok.step(t, finished=k == len(tokens) - 1)[0] for k, t in enumerate(tokens))
    return texts, time.monotonic() - started


def _preemptions(url: str) -> int:
    """The server's preemption counter: proof that the pool, not the batch limit, held the load back."""
    from prometheus_client import parser  # noqa: PLC0415

    from fleetlm_runtime import contract  # noqa: PLC0415

    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return int(
        sum(
            s.value
            for family in parser.text_string_to_metric_families(text)
            if family.name == contract.NUM_PREEMPTIONS
            for s in family.samples
            if s.name.endswith("_total")
        )
    )


def _vocab_size(model: str) -> int:
    """The vocabulary the prompts are drawn from (the tokenizer's, without loading any weights)."""
    import transformers  # noqa: PLC0415

    from fleetlm_runtime.models import builtin  # noqa: PLC0415

    if builtin.is_builtin(model):
        name = model.removeprefix(builtin.BUILTIN_PREFIX)
        if name not in builtin.BUILTINS:
            raise ValueError(f"unknown built-in model {model!r}; choose one of {sorted(builtin.BUILTINS)}")
        return len(builtin.build_tokenizer(builtin.BUILTINS[name].vocab_size))
    return len(transformers.AutoTokenizer.from_pretrained(model, local_files_only=True))


def run(spec: Spec, *, workdir: pathlib.Path | None = None) -> dict[str, Any]:
    """Start the server, drive the load, stop it, check greedy outputs; the figures (asserts nothing)."""
    workload = make_workload(spec, _vocab_size(spec.model))
    worst, pool = pool_tokens_for(workload, spec.concurrency, spec.load_factor)
    if spec.checks and spec.checks < spec.requests:
        step = spec.requests / spec.checks
        keep = sorted({int(k * step) for k in range(spec.checks)})
    else:
        keep = list(range(spec.requests))
    config_data = {
        "model": {"source": spec.model, "dtype": "float32", "maxModelLen": MAX_MODEL_LEN},
        "batching": {
            "maxBatchSize": spec.concurrency,
            "maxBatchTokens": 512,
            "maxQueueLen": 4 * spec.concurrency,
            "maxKvTokens": pool,
        },
        "server": {"engineProcess": True, "drainGracePeriodS": 10},
        "caching": {"responseCache": {"enabled": False}},
    }
    with tempfile.TemporaryDirectory(prefix="fleetlm-overload-") as tmp:
        server = Server(pathlib.Path(workdir or tmp), config_data)
        try:
            server.wait_ready()
            pids = {"server": server.proc.pid, "engine": _engine_child(server.proc.pid)}
            seen = asyncio.run(_drive(server, workload, spec, pids, set(keep)))
            preemptions = _preemptions(server.url)
            log_tail = server.log()
        finally:
            exit_code = server.stop()
    references, reference_s = _references(spec, workload, [i for i in keep if i in seen["texts"]])
    mismatches = [i for i, text in references.items() if seen["texts"][i] != text]
    warm_done = max(1, int(WARMUP_FRACTION * spec.requests))
    memory = {}
    for name, series in seen["samples"].items():
        growth, peak, warm = growth_pct(series, warm_done)
        memory[name] = {
            "warm_mib": round(warm / 2**20, 1),
            "end_mib": round(series[-1][2] / 2**20, 1),
            "growth_pct": round(growth, 3),
            "max_after_warmup_pct": round(peak, 3),
        }
    return {
        "model": spec.model,
        "requests": spec.requests,
        "concurrency": spec.concurrency,
        "pool_tokens": pool,
        "worst_case_tokens": worst,
        "load_over_pool": worst / pool,
        "completed": seen["completed"],
        "errors": len(seen["errors"]),
        "first_errors": seen["errors"][:3],
        "preemptions": preemptions,
        "seconds": round(seen["seconds"], 1),
        "output_tokens_per_s": round(sum(workload.max_tokens) / seen["seconds"], 1),
        "ready_polls": seen["ready"]["polls"],
        "ready_not_ready": seen["ready"]["not_ready"],
        "ready_first_failures": seen["ready"]["first_failures"],
        "greedy_checked": len(references),
        "greedy_mismatches": mismatches,
        "reference_seconds": round(reference_s, 1),
        "memory": memory,
        "samples": {name: [list(s) for s in series] for name, series in seen["samples"].items()},
        "warmup_completed": warm_done,
        "server_exit_code": exit_code,
        "server_log_tail": log_tail if seen["errors"] or exit_code else "",
    }


def verdicts(result: dict[str, Any]) -> dict[str, bool]:
    """The issue's properties, each true or false (the test and `--check` use the same ones)."""
    return {
        "every request completed": result["completed"] == result["requests"] and result["errors"] == 0,
        "greedy equal to generate()": result["greedy_checked"] > 0 and not result["greedy_mismatches"],
        "/ready never flipped": result["ready_polls"] > 0 and result["ready_not_ready"] == 0,
        f"RSS growth under {MAX_GROWTH_PCT}%": all(m["growth_pct"] < MAX_GROWTH_PCT for m in result["memory"].values()),
        "load needs >= 3x the pool": result["load_over_pool"] >= 3.0 - 1e-9,
    }


def write_curve(result: dict[str, Any], directory: pathlib.Path) -> list[pathlib.Path]:
    """The RSS curve as a text table and a PNG (matplotlib, when installed): the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    table = directory / f"overload-{stamp}.txt"
    lines = ["# t_s\tcompleted\tserver_rss_mib\tengine_rss_mib"]
    for (t, done, server), (_, _, engine) in zip(result["samples"]["server"], result["samples"]["engine"], strict=True):
        lines.append(f"{t:.2f}\t{done}\t{server / 2**20:.2f}\t{engine / 2**20:.2f}")
    table.write_text("\n".join(lines) + "\n")
    written = [table]
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        from matplotlib import pyplot  # noqa: PLC0415
    except ImportError:
        return written
    figure, axes = pyplot.subplots(2, 1, figsize=(8, 5), sharex=True)
    for axis, name in zip(axes, ("server", "engine"), strict=True):
        series = result["samples"][name]
        axis.plot([s[1] for s in series], [s[2] / 2**20 for s in series])
        m = result["memory"][name]
        axis.axvline(result["warmup_completed"], color="grey", linestyle=":")
        axis.set_ylabel(f"{name} RSS (MiB)")
        axis.set_title(f"{name}: {m['warm_mib']} -> {m['end_mib']} MiB after warm-up ({m['growth_pct']:+.2f}%)")
    axes[-1].set_xlabel("requests completed")
    figure.suptitle(
        f"{result['requests']} requests, {result['concurrency']} clients, load {result['load_over_pool']:.1f}x the pool"
    )
    figure.tight_layout()
    png = directory / f"overload-{stamp}.png"
    figure.savefig(png, dpi=90)
    pyplot.close(figure)
    return [*written, png]


def render(result: dict[str, Any], files: Sequence[pathlib.Path] = ()) -> str:
    lines = [
        f"KV pool overload through a real fleetlm-runtime — {result['model']}, {result['requests']} greedy requests, "
        f"{result['concurrency']} closed-loop clients",
        f"  pool {result['pool_tokens']} tokens; the batch at its worst would hold {result['worst_case_tokens']} "
        f"tokens = {result['load_over_pool']:.2f}x the pool",
        f"  completed {result['completed']}/{result['requests']}, errors {result['errors']} "
        f"{result['first_errors'] or ''}, preemptions {result['preemptions']}, {result['seconds']} s "
        f"({result['output_tokens_per_s']} output tok/s)",
        f"  /ready polled {result['ready_polls']} times every {READY_INTERVAL_S * 1000:.0f} ms: not ready "
        f"{result['ready_not_ready']} {result['ready_first_failures'] or ''}",
        f"  greedy equal to generate(): {result['greedy_checked'] - len(result['greedy_mismatches'])}/"
        f"{result['greedy_checked']} checked {result['greedy_mismatches'][:10] or ''}",
    ]
    for name, m in result["memory"].items():
        curve = [round(s[2] / 2**20, 1) for s in result["samples"][name]]
        picks = [curve[round(k * (len(curve) - 1) / 10)] for k in range(11)]
        lines.append(
            f"  {name} RSS MiB at warm-up ({result['warmup_completed']} done) {m['warm_mib']} -> end {m['end_mib']}: "
            f"growth {m['growth_pct']:+.2f}% (max after warm-up {m['max_after_warmup_pct']:+.2f}%); "
            f"curve at 0..100% of the run: {picks}"
        )
    for name, ok in verdicts(result).items():
        lines.append(f"  [{'PASS' if ok else 'FAIL'}] {name}")
    lines += [f"  wrote {f}" for f in files]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleetlm-dev bench overload", description=__doc__.splitlines()[0])
    default = Spec()
    parser.add_argument("--requests", type=int, default=default.requests)
    parser.add_argument("--concurrency", type=int, default=default.concurrency)
    parser.add_argument("--checks", type=int, default=default.checks, help="greedy checks (0: every request)")
    parser.add_argument("--model", default=default.model, help="builtin:tiny (default) or a checkpoint directory")
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.add_argument("--check", action="store_true", help="exit 1 when a property does not hold")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if min(args.requests, args.concurrency) < 1 or args.checks < 0:
        parser.error("--requests and --concurrency must be >= 1, --checks >= 0")
    spec = Spec(
        requests=args.requests, concurrency=args.concurrency, checks=args.checks, model=args.model, seed=args.seed
    )
    result = run(spec)
    files = write_curve(result, paths.cache_root() / "bench" / "overload")
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "samples"} | {"files": [str(f) for f in files]}))
    else:
        print(render(result, files))
    return 0 if not args.check or all(verdicts(result).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
