"""Engine TTFT on a shared-prefix workload, with and without the prefix cache (issue #5, 5a).

Every request is one shared system prompt (`--prefix-len` tokens) plus a short unique question, greedy,
EOS ignored. Closed loop per concurrency level: a new request arrives as soon as one finishes, so TTFT
is the engine's own (queue + prefill), without HTTP. Both engines share one loaded model and run the
same requests in the same process, alternating per level so machine noise hits both alike; outputs of
the two are checked equal.

    python -m fleetlm_dev.bench_prefix_cache --model builtin:small --requests 16 --concurrency 1,4
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Sequence

import torch

from fleetlm_runtime.engine import config as config_mod
from fleetlm_runtime.engine import core
from fleetlm_runtime.engine import request as request_mod
from fleetlm_runtime.models import loader


def run(
    engine: core.EngineCore, prompts: list[list[int]], concurrency: int, output_len: int
) -> tuple[list[float], dict[str, list[int]], int]:
    params = request_mod.SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True, detokenize=False)
    pending = list(enumerate(prompts))
    arrival: dict[str, float] = {}
    ttft: list[float] = []
    tokens: dict[str, list[int]] = {}
    hits = 0
    in_flight = 0
    while pending or engine.has_unfinished_requests():
        while pending and in_flight < concurrency:
            i, prompt = pending.pop(0)
            req_id = f"r{i}"
            arrival[req_id] = time.perf_counter()
            engine.add_request(engine.make_request(req_id=req_id, prompt_token_ids=prompt, sampling_params=params))
            tokens[req_id] = []
            in_flight += 1
        outs, stats = engine.step()
        now = time.perf_counter()
        if stats is not None:
            hits += stats.prefix_cache_hits
        for out in outs:
            if not tokens[out.req_id]:
                ttft.append(now - arrival[out.req_id])
            tokens[out.req_id].extend(out.new_token_ids)
            if out.finished:
                in_flight -= 1
    return ttft, tokens, hits


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:small")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--concurrency", default="1,4")
    p.add_argument("--prefix-len", type=int, default=512)
    p.add_argument("--question-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = loader.load(args.model)
    rng = random.Random(args.seed)
    prefix = [rng.randrange(10, 250) for _ in range(args.prefix_len)]

    def prompts() -> list[list[int]]:  # fresh questions per run, so only the shared prefix can hit
        return [prefix + [rng.randrange(10, 250) for _ in range(args.question_len)] for _ in range(args.requests)]

    common = {"max_batch_size": 16, "max_batch_tokens": 1024}
    engines = {
        "cache": core.EngineCore(config_mod.EngineConfig(**common), loaded=loaded),  # type: ignore[arg-type]
        "no-cache": core.EngineCore(config_mod.EngineConfig(prefix_cache_max_tokens=0, **common), loaded=loaded),  # type: ignore[arg-type]
    }
    warm = prompts()[:2]
    for engine in engines.values():
        run(engine, warm, 1, 2)  # warm-up (and, for the cache, the first sight of the prefix)
    print(
        f"{args.model}: {args.requests} requests per run, prefix {args.prefix_len} + question "
        f"{args.question_len} tokens, {args.output_len} output tokens, torch threads {torch.get_num_threads()}"
    )
    print("  concurrency   TTFT p50 no-cache   TTFT p50 cache   speedup   hit tokens   outputs equal")
    for level in (int(c) for c in args.concurrency.split(",")):
        batch = prompts()
        ttft_off, out_off, _ = run(engines["no-cache"], batch, level, args.output_len)
        ttft_on, out_on, hits = run(engines["cache"], batch, level, args.output_len)
        p50_off, p50_on = statistics.median(ttft_off), statistics.median(ttft_on)
        print(
            f"  {level:11d}   {p50_off * 1e3:14.1f} ms   {p50_on * 1e3:11.1f} ms   {p50_off / p50_on:6.1f}x"
            f"   {hits:10d}   {out_on == out_off}"
        )
    for engine in engines.values():
        engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
