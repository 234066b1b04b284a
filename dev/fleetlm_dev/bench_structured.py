"""`fleetlm-dev bench structured`: decode tokens/s at 32 streams, half of them constrained by a JSON
Schema, against all 32 unconstrained, in the same run.

The engine core runs one model; each round starts 32 fresh sequences and times their first decode steps:
the schemas' shortest instances are longer than the timed steps, so no constrained sequence ends early and
both modes decode over the same context lengths. Both modes sample (temperature 1, a seed per sequence),
with EOS ignored by the unconstrained ones, so only the grammar differs. Only pure-decode steps at the
full batch are timed (the engine's own step time: schedule, forward, sample, update), and the modes
alternate round by round on one warm engine, so machine noise and warm-up hit both alike. The figures are
the ratio of the medians over rounds and the median of the per-round ratios, constrained-half tok/s over
unconstrained tok/s (the bar is >= 0.85). The schemas have arrays, nested objects, enums and bounded
strings; they compile once, before the timing (the compile times are printed). A script that prints
figures, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from fleetlm_runtime.engine import config as config_mod
from fleetlm_runtime.engine import core, sampling
from fleetlm_runtime.engine import request as request_mod
from fleetlm_runtime.models import loader
from fleetlm_runtime.structured import formats, grammar

STREAMS = 32
_S = {"type": "string", "maxLength": 24}
SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"name": _S, "qty": {"type": "integer", "minimum": 0, "maximum": 999}},
                    "required": ["name", "qty"],
                },
                "minItems": 12,
                "maxItems": 16,
            },
            "status": {"enum": ["open", "closed", "pending"]},
        },
        "required": ["items", "status"],
    },
    {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": _S,
                    "email": _S,
                    "tags": {"type": "array", "items": {"enum": ["alpha", "beta", "gamma"]}, "minItems": 24},
                },
                "required": ["name", "email", "tags"],
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
    },
]


def _measure(
    engine: core.EngineCore,
    *,
    constrained: int,
    steps: int,
    max_tokens: int,
    constraints: list[Any],
    rng: random.Random,
    vocab: int,
) -> tuple[float, list[float]]:
    """Decode tokens/s over the first `steps` decode steps of 32 fresh sequences, `constrained` of them
    constrained (the schemas' shortest instance is longer than `steps` tokens, so the batch stays full and
    both modes decode over the same context lengths), and the compile times seen. Leaves the engine empty."""
    live: list[str] = []
    for slot in range(STREAMS):
        constraint = constraints[slot % len(constraints)] if slot < constrained else None
        params = request_mod.SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0,
            seed=rng.getrandbits(32),
            ignore_eos=constraint is None,
            constraint=constraint,
        )
        prompt = [rng.randrange(10, vocab) for _ in range(8)]
        req_id = f"r{rng.getrandbits(48)}"
        engine.add_request(engine.make_request(req_id=req_id, prompt_token_ids=prompt, sampling_params=params))
        live.append(req_id)
    tokens = 0
    seconds = 0.0
    compiles: list[float] = []
    for _ in range(steps + 8):
        _, stats = engine.step()
        if stats is None:
            break
        compiles += stats.grammar_compile_s
        if stats.num_prefill_tokens == 0 and stats.batch_size == STREAMS:
            tokens += stats.num_decode_tokens
            seconds += stats.step_duration_s
    engine.abort_requests(live)
    while engine.has_unfinished_requests():
        engine.step()
    return tokens / seconds, compiles


def _sampler_cost(loaded: loader.LoadedModel, constraints: list[Any], *, iters: int) -> tuple[float, float]:
    """The sampler alone on one [32, vocab] logits batch, sampled rows: ms per step with no constrained row
    and with 16 (mask filled and applied, tokens accepted), interleaved call by call. Matchers walk their
    grammars on the tokens they sample and start again when complete. This isolates what constraining adds
    to a step from the forward pass, whose time swamps it on a busy machine."""
    vocab = loaded.vocab_size
    cache = grammar.GrammarCache(loaded.tokenizer, vocab_size=vocab, stop_token_ids=sorted(loaded.eos_token_ids))
    rng = random.Random(1)
    plain = [
        sampling.SamplingState.from_params(request_mod.SamplingParams(temperature=1.0, seed=i), fallback_rng=rng)
        for i in range(STREAMS)
    ]
    half = []
    for i in range(STREAMS):
        constraint = constraints[i % len(constraints)] if i < STREAMS // 2 else None
        params = request_mod.SamplingParams(temperature=1.0, seed=i, constraint=constraint)
        state = sampling.SamplingState.from_params(params, fallback_rng=rng)
        state.grammar = cache.matcher(constraint) if constraint is not None else None
        half.append(state)
    logits = torch.randn(STREAMS, vocab, generator=torch.Generator().manual_seed(0)).to(loaded.dtype)
    plain_s = half_s = 0.0
    for _ in range(iters):
        batch = logits.clone()
        started = time.perf_counter()
        sampling.sample(batch, plain, all_greedy=False, any_special=False)
        plain_s += time.perf_counter() - started
        batch = logits.clone()
        started = time.perf_counter()
        sampling.sample(batch, half, all_greedy=False, any_special=True)
        half_s += time.perf_counter() - started
        for state in half[: STREAMS // 2]:
            if state.grammar is None or state.grammar.is_terminated:
                state.grammar = cache.matcher(state.params.constraint)  # type: ignore[arg-type]
    return 1000 * plain_s / iters, 1000 * half_s / iters


def sampler_only(model: str, *, threads: int | None) -> dict[str, Any]:
    """The sampler's cost alone (no forward pass): for large vocabularies on a CPU too slow to run the model."""
    if threads:
        torch.set_num_threads(threads)
    loaded = loader.load(model)
    constraints = [formats.schema_constraint(s, param="schema") for s in SCHEMAS]
    plain_ms, half_ms = _sampler_cost(loaded, constraints, iters=300)
    return {"model": model, "vocab_size": loaded.vocab_size, "sampler_ms_unconstrained": round(plain_ms, 3),
            "sampler_ms_half_constrained": round(half_ms, 3)}  # fmt: skip


def run(model: str, *, rounds: int, steps: int, max_tokens: int, threads: int | None) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    loaded = loader.load(model)
    engine = core.EngineCore(
        config_mod.EngineConfig(model=model, max_batch_size=STREAMS, max_batch_tokens=512, max_model_len=1024),
        loaded=loaded,
    )
    constraints = [formats.schema_constraint(s, param="schema") for s in SCHEMAS]
    rng = random.Random(0)
    started = time.perf_counter()
    # Warm-up (and the compiles, once per schema, outside the timing).
    _, compiles = _measure(engine, constrained=STREAMS // 2, steps=10, max_tokens=max_tokens,
                           constraints=constraints, rng=rng, vocab=loaded.vocab_size)  # fmt: skip
    _measure(engine, constrained=0, steps=10, max_tokens=max_tokens, constraints=constraints, rng=rng,
             vocab=loaded.vocab_size)  # fmt: skip
    plain: list[float] = []
    half: list[float] = []
    for _ in range(rounds):
        for constrained, figures in ((0, plain), (STREAMS // 2, half)):
            tps, _ = _measure(engine, constrained=constrained, steps=steps, max_tokens=max_tokens,
                              constraints=constraints, rng=rng, vocab=loaded.vocab_size)  # fmt: skip
            figures.append(tps)
    engine.close()
    sampler_plain_ms, sampler_half_ms = _sampler_cost(loaded, constraints, iters=300)
    plain_tps, half_tps = statistics.median(plain), statistics.median(half)
    step_ms = 1000 * STREAMS / plain_tps  # the unconstrained engine step at 32 streams
    added_ms = sampler_half_ms - sampler_plain_ms
    paired = statistics.median(h / u for h, u in zip(half, plain, strict=True))
    return {
        "model": model,
        "vocab_size": loaded.vocab_size,
        "streams": STREAMS,
        "rounds": rounds,
        "steps_per_round": steps,
        "grammar_compile_ms": [round(s * 1000, 2) for s in compiles],
        "unconstrained_tok_s": round(plain_tps, 1),
        "half_constrained_tok_s": round(half_tps, 1),
        "ratio": round(half_tps / plain_tps, 3),
        "median_paired_ratio": round(paired, 3),
        "sampler_ms_unconstrained": round(sampler_plain_ms, 3),
        "sampler_ms_half_constrained": round(sampler_half_ms, 3),
        "projected_ratio": round(step_ms / (step_ms + added_ms), 3),
        "per_round_unconstrained": [round(x, 1) for x in plain],
        "per_round_half_constrained": [round(x, 1) for x in half],
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", help="builtin:tiny, builtin:small or a checkpoint directory")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=40, help="timed decode steps per mode per round")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--sampler-only", action="store_true", help="only the sampler's cost, no engine runs")
    args = p.parse_args(argv)
    for model in args.model or ["builtin:tiny"]:
        if args.sampler_only:
            figures = sampler_only(model, threads=args.threads)
            print(json.dumps(figures) if args.json else f"{model}: sampler alone, 32 rows, ms/step: {figures}")
            continue
        result = run(model, rounds=args.rounds, steps=args.steps, max_tokens=args.max_tokens, threads=args.threads)
        if args.json:
            print(json.dumps(result))
            continue
        print(
            f"{result['model']} (vocab {result['vocab_size']}), {STREAMS} streams, {result['rounds']} rounds x "
            f"{result['steps_per_round']} steps, interleaved\n"
            f"  unconstrained:    {result['unconstrained_tok_s']:>9.1f} decode tok/s "
            f"{result['per_round_unconstrained']}\n"
            f"  half constrained: {result['half_constrained_tok_s']:>9.1f} decode tok/s "
            f"{result['per_round_half_constrained']}\n"
            f"  ratio (bar >= 0.85):  {result['ratio']:.3f} of the medians, "
            f"{result['median_paired_ratio']:.3f} median of the per-round ratios\n"
            f"  sampler alone, ms/step: {result['sampler_ms_unconstrained']} unconstrained, "
            f"{result['sampler_ms_half_constrained']} half constrained -> ratio projected on the measured "
            f"unconstrained step: {result['projected_ratio']:.3f}\n"
            f"  grammar compiles (ms): {result['grammar_compile_ms']}"
        )
    return 0
