"""`fleetlm-dev bench engine`: engine throughput and overhead against transformers' own baselines.

For each model (default: `builtin:tiny` and `builtin:small`, both made in code) it prints:

* output tokens/s through `AsyncEngine` at 1, 8, 32 and 64 concurrent requests (closed loop: each client
  sends its next request as soon as the previous one ends; measured while all clients are busy, i.e.
  until the first one finds no more work), with the ratio to running `generate()` sequentially on
  requests drawn from the same distribution (ratio a);
* the engine's step time at batch 32 against a bare batched forward pass of the same shape (32 sequences,
  one new token each, a `DynamicCache` of the same length, stock SDPA attention), measured interleaved
  step by step so that machine noise hits both alike (ratio b, "overhead" = 1 - bare/step);
* whether the engine's greedy outputs equal `generate(do_sample=False)` token for token;
* memory (RSS) sampled over 2,000 requests through the engine, and the KV held once they are done.

Two more modes. `--against REV` (or `--against-path DIR`) measures the tok/s table for this tree and for
another revision in the same run, interleaved (`bench_engine_ab.py`), and prints both and the ratio.
`--overload` runs 2,000 requests on a KV pool a third the size the load would need at its worst: how many
complete, errors, preemptions, the resident memory (start/mid/end, growth %) and greedy spot checks
against `generate()`.

Every request is greedy with EOS ignored (and `generate()` runs with no EOS), so both sides produce
exactly `max_tokens` tokens per request and the token counts compare like for like. The baselines use a
fresh, stock copy of the model; the engine uses the process-wide one. This is a script that prints
figures, not a test: it asserts nothing, and `--json` gives machine-readable output.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
import transformers
from tqdm import tqdm

from fleetlm_runtime.engine import async_engine, core, outputs
from fleetlm_runtime.engine import config as config_mod
from fleetlm_runtime.engine import request as request_mod
from fleetlm_runtime.models import builtin, loader

CONCURRENCY = (1, 8, 32, 64)
OVERHEAD_BATCH = 32
TARGET_RATIO_AT_32 = 12.0
TARGET_OVERHEAD = 0.20


@dataclasses.dataclass(frozen=True, slots=True)
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]

    def __len__(self) -> int:
        return len(self.prompts)


def make_workload(
    num: int, *, vocab_size: int, seed: int, prompt_len: tuple[int, int], output_len: tuple[int, int]
) -> Workload:
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab_size) for _ in range(rng.randint(*prompt_len))] for _ in range(num)]
    return Workload(prompts=prompts, max_tokens=[rng.randint(*output_len) for _ in range(num)])


def _greedy(max_tokens: int) -> request_mod.SamplingParams:
    return request_mod.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _stock_model(spec: str) -> transformers.PreTrainedModel:
    """A second copy of the model for the baselines, with stock SDPA attention and no EOS, so that its
    generate() runs to max_new_tokens like the engine's requests with ignore_eos (a None in a generation
    config passed to generate() would be filled back in from the model's own config)."""
    if builtin.is_builtin(spec):
        model, _ = builtin.build(spec.removeprefix(builtin.BUILTIN_PREFIX))
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            spec, dtype=torch.float32, local_files_only=True, use_safetensors=True, attn_implementation="sdpa"
        ).eval()
    model.generation_config.eos_token_id = None
    return model


# ------------------------------------------------------------------------------------------------------
# Baselines


def run_sequential(model: transformers.PreTrainedModel, workload: Workload, num: int) -> tuple[float, list[list[int]]]:
    """generate() one request after another; returns (output tokens/s, the outputs)."""
    results: list[list[int]] = []
    num_tokens = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for prompt, max_tokens in zip(workload.prompts[:num], workload.max_tokens[:num], strict=True):
            ids = torch.tensor([prompt])
            # An explicit mask: otherwise generate() masks prompt tokens equal to the pad id.
            out = model.generate(  # type: ignore[operator]  # PreTrainedModel's type lacks generate(): GenerationMixin's
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_tokens
            )
            tokens = out[0, len(prompt) :].tolist()
            results.append(tokens)
            num_tokens += len(tokens)
    return num_tokens / (time.perf_counter() - started), results


class BareDecoder:
    """The baseline for the overhead ratio: a batched decode forward with a DynamicCache, nothing else."""

    def __init__(self, model: transformers.PreTrainedModel, prompts: list[list[int]]) -> None:
        self.model = model
        with torch.inference_mode():
            out = model(torch.tensor(prompts), use_cache=True)
        self.cache = out.past_key_values
        self.next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        self.length = len(prompts[0])

    def step(self) -> float:
        batch = self.next_ids.shape[0]
        position_ids = torch.full((batch, 1), self.length)
        mask = torch.ones(batch, self.length + 1, dtype=torch.long)
        with torch.inference_mode():
            started = time.perf_counter()
            out = self.model(
                self.next_ids,
                past_key_values=self.cache,
                position_ids=position_ids,
                attention_mask=mask,
                use_cache=True,
            )
            elapsed = time.perf_counter() - started
        self.cache = out.past_key_values
        self.next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        self.length += 1
        return elapsed


# ------------------------------------------------------------------------------------------------------
# Engine runs


class StatsCollector:
    """The engine's stats callback: keeps every step's EngineStats while `keep` is set."""

    def __init__(self) -> None:
        self.items: list[outputs.EngineStats] = []
        self.keep = True

    def __call__(self, stats: outputs.EngineStats) -> None:
        if self.keep:
            self.items.append(stats)


async def run_concurrency(
    engine: async_engine.AsyncEngine,
    collector: StatsCollector,
    workload: Workload,
    *,
    concurrency: int,
    num_requests: int,
) -> dict[str, Any]:
    stats: list[outputs.EngineStats] = []
    collector.items = stats
    queue = list(range(num_requests))
    num_tokens = 0
    # Steady state ends when the first client finds the queue empty: from then on fewer than
    # `concurrency` requests are in flight (the ramp-down of a finite run), which is not what we measure.
    steady: tuple[float, int] | None = None

    async def client() -> None:
        nonlocal num_tokens, steady
        while queue:
            i = queue.pop() % len(workload)
            stream = engine.submit(workload.prompts[i], _greedy(workload.max_tokens[i]))
            async for out in stream:
                num_tokens += len(out.new_token_ids)
        if steady is None:
            steady = (time.perf_counter(), num_tokens)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    assert steady is not None
    steady_s, steady_tokens = steady[0] - started, steady[1]
    steps = [s.step_duration_s for s in stats]
    full = [s.step_duration_s for s in stats if s.batch_size == concurrency and s.num_prefill_tokens == 0]
    return {
        "concurrency": concurrency,
        "requests": num_requests,
        "output_tokens": num_tokens,
        "seconds": elapsed,
        "tokens_per_s_overall": num_tokens / elapsed,  # including the ramp-down
        "tokens_per_s": steady_tokens / steady_s,  # while `concurrency` requests were in flight
        "steps": len(steps),
        "step_p50_ms": 1e3 * statistics.median(steps) if steps else None,
        "full_decode_step_p50_ms": 1e3 * statistics.median(full) if full else None,
        "mean_batch": statistics.fmean(s.batch_size for s in stats) if stats else None,
    }


async def engine_outputs(engine: async_engine.AsyncEngine, workload: Workload, num: int) -> list[list[int]]:
    async def one(i: int) -> list[int]:
        tokens: list[int] = []
        async for out in engine.generate(workload.prompts[i], _greedy(workload.max_tokens[i])):
            tokens.extend(out.new_token_ids)
        return tokens

    return list(await asyncio.gather(*(one(i) for i in range(num))))


def measure_overhead(
    loaded: loader.LoadedModel, stock: transformers.PreTrainedModel, *, prompt_len: int, steps: int, seed: int
) -> dict[str, Any]:
    """Engine step (schedule + forward + sample + update + detokenize) vs a bare forward, batch 32."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(loaded.vocab_size) for _ in range(prompt_len)] for _ in range(OVERHEAD_BATCH)]
    engine = core.EngineCore(
        config_mod.EngineConfig(max_batch_size=OVERHEAD_BATCH, max_batch_tokens=OVERHEAD_BATCH * prompt_len),
        loaded=loaded,
    )
    try:
        for i, prompt in enumerate(prompts):
            engine.add_request(
                engine.make_request(req_id=f"o{i}", prompt_token_ids=prompt, sampling_params=_greedy(steps + 8))
            )
        engine.step()  # the prefill step, not measured
        bare = BareDecoder(stock, prompts)
        engine_s: list[float] = []
        model_s: list[float] = []
        bare_s: list[float] = []
        for _ in range(steps):  # interleaved, so both see the same context length and machine noise
            started = time.perf_counter()
            engine.step()
            engine_s.append(time.perf_counter() - started)
            model_s.append(engine.runner.last_model_s)
            bare_s.append(bare.step())
    finally:
        engine.abort_requests([f"o{i}" for i in range(OVERHEAD_BATCH)])
        engine.close()
    step = statistics.median(engine_s[2:])
    forward = statistics.median(bare_s[2:])
    # The engine's own share: the step minus its model time (forward + output head), per step.
    outside = statistics.median(1.0 - m / e for m, e in zip(model_s[2:], engine_s[2:], strict=True))
    return {
        "batch": OVERHEAD_BATCH,
        "context_tokens": f"{prompt_len}-{prompt_len + steps}",
        "engine_step_p50_ms": 1e3 * step,
        "engine_model_p50_ms": 1e3 * statistics.median(model_s[2:]),
        "bare_forward_p50_ms": 1e3 * forward,
        "step_over_forward": step / forward,
        "overhead_fraction": 1.0 - forward / step,  # ratio (b): negative when the step beats the bare forward
        "outside_model_fraction": outside,  # scheduling, input prep, sampling, detokenizing, outputs
    }


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource  # noqa: PLC0415  (fallback: peak, not current)

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def measure_memory(
    engine: async_engine.AsyncEngine, *, num_requests: int, concurrency: int, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    vocab = engine.core.loaded.vocab_size
    started = done = 0
    samples: list[tuple[int, int]] = []
    every = max(1, num_requests // 10)

    async def client() -> None:
        nonlocal started, done
        while started < num_requests:
            started += 1
            prompt = [rng.randrange(vocab) for _ in range(rng.randint(8, 128))]
            params = request_mod.SamplingParams(max_tokens=rng.randint(4, 64), temperature=rng.choice([0.0, 0.8]))
            stream = engine.submit(prompt, params)
            if rng.random() < 0.1:  # some clients go away mid-stream: their KV must come back too
                async for _ in stream:
                    stream.abort()
                    break
            async for _ in stream:
                pass
            done += 1
            if done % every == 0:
                samples.append((done, _rss_bytes()))

    samples.append((0, _rss_bytes()))
    await asyncio.gather(*(client() for _ in range(concurrency)))
    await asyncio.sleep(0.05)  # let the last aborts reach the engine
    rss = [r for _, r in samples]
    warm = rss[min(2, len(rss) - 1)]
    return {
        "requests": done,
        "rss_mib": [round(r / 2**20, 1) for r in rss],
        "rss_growth_after_warmup_mib": round((rss[-1] - warm) / 2**20, 1),
        "kv_reserved_tokens_after": engine.core.scheduler.kv.num_used_tokens,
        "kv_slots_after": engine.core.runner.num_requests,
        "kv_buffer_mib_after": round(engine.core.runner.pool_bytes / 2**20, 2),
    }


# ------------------------------------------------------------------------------------------------------
# Overload: a load needing about three times the KV pool


async def run_overload(spec: str, *, num_requests: int, concurrency: int, seed: int, checks: int) -> dict[str, Any]:
    """`concurrency` closed-loop clients over `num_requests` greedy requests, on a pool a third of what the
    running batch would hold at its worst (prompt + max_tokens of `concurrency` average requests)."""
    loaded = loader.load(spec, dtype="float32")
    workload = make_workload(
        num_requests, vocab_size=loaded.vocab_size, seed=seed, prompt_len=(16, 128), output_len=(32, 128)
    )
    worst = concurrency * statistics.fmean(
        len(p) + m for p, m in zip(workload.prompts, workload.max_tokens, strict=True)
    )
    pool_tokens = int(worst / 3)
    preemptions = 0

    def count(stats: outputs.EngineStats) -> None:  # keeps nothing: our own memory must stay flat too
        nonlocal preemptions
        preemptions += stats.num_preemptions

    engine = async_engine.AsyncEngine(
        core.EngineCore(
            config_mod.EngineConfig(max_batch_size=concurrency, max_batch_tokens=512, max_kv_tokens=pool_tokens),
            loaded=loaded,
        ),
        stats_callback=count,
    )
    engine.start()
    info = engine.core.info
    check_every = max(1, num_requests // checks)
    got: dict[int, list[int]] = {}
    errors: list[str] = []
    completed = 0
    samples: list[tuple[int, int]] = [(0, _rss_bytes())]
    every = max(1, num_requests // 20)
    queue = list(range(num_requests))[::-1]

    async def client() -> None:
        nonlocal completed
        while queue:
            i = queue.pop()
            tokens: list[int] = []
            try:
                async for out in engine.submit(workload.prompts[i], _greedy(workload.max_tokens[i])):
                    tokens.extend(out.new_token_ids)
                    if out.finished and out.error is not None:
                        errors.append(out.error)
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if len(tokens) != workload.max_tokens[i]:
                errors.append(f"request {i}: {len(tokens)} tokens, expected {workload.max_tokens[i]}")
            completed += 1
            if i % check_every == 0:
                got[i] = tokens
            if completed % every == 0:
                samples.append((completed, _rss_bytes()))

    started = time.perf_counter()
    try:
        await asyncio.gather(*(client() for _ in range(concurrency)))
    finally:
        elapsed = time.perf_counter() - started
        await engine.shutdown()
    equal = _spot_check(spec, workload, got)
    rss = [r for _, r in samples]
    warm = rss[1] if len(rss) > 1 else rss[0]  # after the first 5%: allocator and caches settled
    return {
        "model": spec,
        "requests": num_requests,
        "concurrency": concurrency,
        "pool_tokens": info.kv_capacity_tokens,
        "pool_blocks": info.kv_num_blocks,
        "pool_mib": round(info.kv_pool_bytes / 2**20, 2),
        "worst_case_tokens": int(worst),
        "load_over_pool": worst / info.kv_capacity_tokens,
        "completed": completed,
        "errors": len(errors),
        "first_errors": errors[:3],
        "preemptions": preemptions,
        "seconds": elapsed,
        "output_tokens_per_s": sum(workload.max_tokens) / elapsed,
        "rss_mib": [round(r / 2**20, 1) for r in rss],
        "rss_start_mid_end_mib": [round(r / 2**20, 1) for r in (warm, rss[len(rss) // 2], rss[-1])],
        "rss_growth_pct": 100.0 * (rss[-1] - warm) / warm,
        "greedy_spot_checks": f"{equal}/{len(got)}",
    }


def _spot_check(spec: str, workload: Workload, got: dict[int, list[int]]) -> int:
    """How many of the requests in `got` generated what the stock model's greedy generate() does."""
    stock = _stock_model(spec)
    equal = 0
    for i in sorted(got):
        _, (reference,) = run_sequential(stock, Workload([workload.prompts[i]], [workload.max_tokens[i]]), 1)
        equal += reference == got[i]
    return equal


def render_overload(result: dict[str, Any]) -> str:
    start, mid, end = result["rss_start_mid_end_mib"]
    return "\n".join(
        [
            f"KV pool overload — {result['model']}, {result['requests']} greedy requests, {result['concurrency']} "
            f"closed-loop clients (prompts 16-128, outputs 32-128 tokens, EOS ignored)",
            f"  pool {result['pool_tokens']} tokens ({result['pool_blocks']} blocks, {result['pool_mib']} MiB); the "
            f"batch at its worst would hold {result['worst_case_tokens']} tokens = {result['load_over_pool']:.2f}x "
            "the pool",
            f"  completed {result['completed']}/{result['requests']}, errors {result['errors']} "
            f"{result['first_errors'] or ''}, preemptions {result['preemptions']}, {result['seconds']:.1f} s "
            f"({result['output_tokens_per_s']:.0f} output tok/s)",
            f"  RSS MiB start {start} / mid {mid} / end {end}: growth {result['rss_growth_pct']:+.2f}% "
            f"(samples every 5%: {result['rss_mib']})",
            f"  greedy spot checks equal to generate(): {result['greedy_spot_checks']}",
        ]
    )


# ------------------------------------------------------------------------------------------------------
# Driver


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    sequential_requests: int  # generate() calls per baseline slice
    slices: int  # (baseline, engine) pairs per concurrency level; the ratio is their median
    requests_per_concurrency: int  # engine requests per slice, times the concurrency
    min_requests: int
    overhead_steps: int
    memory_requests: int


def plan_for(spec: str, quick: bool) -> Plan:
    if spec == "builtin:tiny":
        if quick:
            return Plan(
                sequential_requests=6,
                slices=2,
                requests_per_concurrency=2,
                min_requests=8,
                overhead_steps=32,
                memory_requests=300,
            )
        return Plan(
            sequential_requests=8,
            slices=3,
            requests_per_concurrency=4,
            min_requests=16,
            overhead_steps=64,
            memory_requests=2000,
        )
    if quick:
        return Plan(
            sequential_requests=1,
            slices=1,
            requests_per_concurrency=1,
            min_requests=4,
            overhead_steps=8,
            memory_requests=100,
        )
    return Plan(
        sequential_requests=2,
        slices=2,
        requests_per_concurrency=2,
        min_requests=8,
        overhead_steps=24,
        memory_requests=500,
    )


async def bench_model(spec: str, args: argparse.Namespace, progress: tqdm[Any]) -> dict[str, Any]:
    """The machine may be shared, so every engine measurement is paired with a baseline measured right
    before it, and ratios are medians over those pairs: slow drifts in load hit both sides alike."""
    plan = plan_for(spec, args.quick)
    progress.set_description(f"{spec}: loading")
    loaded = loader.load(spec, dtype="float32")
    stock = _stock_model(spec)
    workload = make_workload(
        256, vocab_size=loaded.vocab_size, seed=args.seed, prompt_len=(16, 128), output_len=(32, 128)
    )
    result: dict[str, Any] = {
        "model": spec,
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "workload": "prompts 16-128 tokens, outputs 32-128 tokens, greedy, EOS ignored",
    }
    collector = StatsCollector()
    engine = async_engine.AsyncEngine(
        core.EngineCore(
            config_mod.EngineConfig(max_batch_size=max(CONCURRENCY), max_batch_tokens=args.max_batch_tokens),
            loaded=loaded,
        ),
        stats_callback=collector,
    )
    engine.start()
    result["forward"] = engine.core.runner.forward_name
    sequential: list[float] = []
    try:
        progress.set_description(f"{spec}: equality with generate()")
        sequential_tps, reference = run_sequential(stock, workload, plan.sequential_requests)
        sequential.append(sequential_tps)
        got = await engine_outputs(engine, workload, plan.sequential_requests)
        result["greedy_equal_to_generate"] = f"{sum(g == r for g, r in zip(got, reference, strict=True))}/{len(got)}"
        await run_concurrency(engine, collector, workload, concurrency=8, num_requests=8)  # warm-up
        runs = []
        for concurrency in CONCURRENCY:
            progress.set_description(f"{spec}: {concurrency} concurrent")
            num = max(plan.min_requests, plan.requests_per_concurrency * concurrency)
            pairs = []
            for _ in range(plan.slices):
                baseline, _ = run_sequential(stock, workload, plan.sequential_requests)
                sequential.append(baseline)
                run = await run_concurrency(engine, collector, workload, concurrency=concurrency, num_requests=num)
                pairs.append((run, baseline))
            pairs.sort(key=lambda pair: pair[0]["tokens_per_s"] / pair[1])
            run, baseline = pairs[(len(pairs) - 1) // 2]  # the median pair (the lower one of two)
            run["sequential_tokens_per_s"] = baseline
            run["vs_sequential_generate"] = run["tokens_per_s"] / baseline
            run["slices"] = [round(r["tokens_per_s"] / b, 2) for r, b in pairs]
            runs.append(run)
            progress.update()
        result["concurrency"] = runs
        result["sequential_generate_tokens_per_s"] = statistics.median(sequential)
        if spec == "builtin:tiny" or args.memory_all:
            progress.set_description(f"{spec}: memory over {plan.memory_requests} requests")
            collector.items, collector.keep = [], False  # the soak measures the engine's memory, not ours
            result["memory"] = await measure_memory(
                engine, num_requests=plan.memory_requests, concurrency=32, seed=args.seed
            )
        progress.update()
    finally:
        await engine.shutdown()

    progress.set_description(f"{spec}: overhead at batch {OVERHEAD_BATCH}")
    result["overhead"] = measure_overhead(loaded, stock, prompt_len=64, steps=plan.overhead_steps, seed=args.seed)
    progress.update()
    return result


def render(report: dict[str, Any]) -> str:
    lines = [
        f"FleetLM engine benchmark — torch {report['torch']}, transformers {report['transformers']}, "
        f"{report['threads']} torch thread(s), {report['cpu']}",
    ]
    for model in report["models"]:
        lines.append("")
        lines.append(
            f"{model['model']} ({model['parameters'] / 1e6:.2f}M parameters; {model['workload']}; "
            f"engine forward: {model['forward']})"
        )
        lines.append(
            f"  sequential generate(): {model['sequential_generate_tokens_per_s']:.0f} output tok/s "
            "(median of the baseline slices)"
        )
        lines.append(f"  greedy outputs equal to generate(): {model['greedy_equal_to_generate']}")
        lines.append(
            "  concurrent  requests   output tok/s   vs generate() [slices]     step p50 ms   full-batch p50 ms"
        )
        for run in model["concurrency"]:
            full = run["full_decode_step_p50_ms"]
            slices = ",".join(f"{x:.1f}" for x in run["slices"])
            lines.append(
                f"  {run['concurrency']:>10}  {run['requests']:>8}   {run['tokens_per_s']:>12.0f}   "
                f"{run['vs_sequential_generate']:>6.1f}x [{slices:<14}]   {run['step_p50_ms']:>11.2f}   "
                f"{'-' if full is None else f'{full:.2f}':>17}"
            )
        over = model["overhead"]
        lines.append(
            f"  batch {over['batch']}, context {over['context_tokens']} tokens: engine step "
            f"{over['engine_step_p50_ms']:.2f} ms (model {over['engine_model_p50_ms']:.2f} ms) vs bare forward "
            f"{over['bare_forward_p50_ms']:.2f} ms: step/bare = {over['step_over_forward']:.2f}, overhead "
            f"{100 * over['overhead_fraction']:.1f}% (target <= {100 * TARGET_OVERHEAD:.0f}%); time outside "
            f"the model {100 * over['outside_model_fraction']:.1f}% of the step"
        )
        if "memory" in model:
            mem = model["memory"]
            lines.append(
                f"  memory over {mem['requests']} requests: RSS MiB {mem['rss_mib']}; growth after warm-up "
                f"{mem['rss_growth_after_warmup_mib']} MiB; after: {mem['kv_reserved_tokens_after']} KV tokens "
                f"reserved, {mem['kv_slots_after']} slots, {mem['kv_buffer_mib_after']} MiB of KV buffers"
            )
    lines.append("")
    lines.append("targets:")
    for target in report["targets"]:
        lines.append(f"  [{'PASS' if target['met'] else 'MISS'}] {target['name']}: {target['value']}")
    return "\n".join(lines)


def targets(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for model in models:
        if model["model"] == "builtin:tiny":
            at32 = next(r for r in model["concurrency"] if r["concurrency"] == 32)
            found.append(
                {
                    "name": "tiny: 32 concurrent >= 12x sequential generate()",
                    "value": f"{at32['vs_sequential_generate']:.1f}x",
                    "met": at32["vs_sequential_generate"] >= TARGET_RATIO_AT_32,
                }
            )
        over = model["overhead"]["overhead_fraction"]
        found.append(
            {
                "name": f"{model['model']}: engine overhead <= 20% of the step at batch 32",
                "value": f"{100 * over:.1f}%",
                "met": over <= TARGET_OVERHEAD,
            }
        )
        if "memory" in model:
            mem = model["memory"]
            flat = mem["kv_reserved_tokens_after"] == 0 and mem["kv_slots_after"] == 0
            flat = flat and mem["rss_growth_after_warmup_mib"] < 16
            found.append(
                {
                    "name": f"{model['model']}: memory flat over {mem['requests']} requests, no KV left",
                    "value": f"{mem['rss_growth_after_warmup_mib']} MiB growth, "
                    f"{mem['kv_reserved_tokens_after']} KV tokens left",
                    "met": flat,
                }
            )
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetlm-dev bench engine", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        default="builtin:tiny,builtin:small",
        help="comma-separated model specs (default: builtin:tiny,builtin:small)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer requests and steps (a minute or so)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for every measurement (default 1: on a small shared "
        "machine more threads mostly add contention)",
    )
    parser.add_argument("--max-batch-tokens", type=int, default=512, help="engine token budget per step")
    parser.add_argument("--memory-all", action="store_true", help="also run the memory soak on every model")
    parser.add_argument("--seed", type=int, default=0)
    against = parser.add_mutually_exclusive_group()
    against.add_argument(
        "--against", metavar="REV", help="only the tok/s table, for this tree and git revision REV, interleaved"
    )
    against.add_argument("--against-path", metavar="DIR", help="as --against, with the tree at DIR")
    parser.add_argument(
        "--overload",
        action="store_true",
        help="only the KV-pool overload run: requests on a pool a third of what the load needs at its worst",
    )
    parser.add_argument("--overload-requests", type=int, default=2000)
    parser.add_argument("--overload-concurrency", type=int, default=64)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    specs = [s.strip() for s in args.models.split(",") if s.strip()]
    if args.against or args.against_path:
        from fleetlm_dev import bench_engine_ab  # noqa: PLC0415

        return bench_engine_ab.run(args, specs)
    if args.overload:
        spec = specs[0] if args.models != build_parser().get_default("models") else "builtin:tiny"
        result = asyncio.run(
            run_overload(
                spec,
                num_requests=args.overload_requests,
                concurrency=args.overload_concurrency,
                seed=args.seed,
                checks=20,
            )
        )
        print(json.dumps(result, indent=2) if args.json else render_overload(result))
        return 0
    models: list[dict[str, Any]] = []
    with tqdm(total=len(specs) * (len(CONCURRENCY) + 3), file=sys.stderr, disable=None) as progress:
        for spec in specs:
            models.append(asyncio.run(bench_model(spec, args, progress)))
    report = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpu": f"{os.cpu_count()} CPUs, {platform.machine()}",
        "models": models,
        "targets": targets(models),
    }
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
