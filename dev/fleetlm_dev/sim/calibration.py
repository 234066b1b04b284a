"""How long one engine step takes, and how long a pod takes to start: the simulator's physics.

A continuous-batching step decodes one token for every running sequence and may carry a chunk of
prompt tokens (chunked prefill). Its time is modelled as

    step_s = base_s + per_seq_s * num_seqs + per_token_s * num_tokens

where num_tokens counts decode tokens (one per decoding sequence) plus prefill tokens. Larger batches
give more tokens per second and a slower step (higher TPOT), which is the trade the batch tuner moves
along. The two built-in profiles are stated assumptions, not measurements; `StepTime.fit` and
`StepTime.from_benchmark` turn the engine benchmark's figures into a profile. This module decides
nothing and does no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True, slots=True)
class StepTime:
    base_s: float  # fixed cost of a step (kernel launches, scheduling, sampling)
    per_seq_s: float  # per running sequence (KV reads, attention)
    per_token_s: float  # per token processed in the step (matmuls); prefill throughput = 1 / per_token_s

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.per_seq_s < 0 or self.per_token_s < 0:
            raise ValueError("step-time coefficients must be non-negative, base_s positive")

    def step_s(self, num_seqs: int, num_tokens: int) -> float:
        return self.base_s + self.per_seq_s * num_seqs + self.per_token_s * num_tokens

    def decode_step_s(self, batch_size: int) -> float:
        """A pure decode step: one token per sequence (about the TPOT at that batch size)."""
        return self.step_s(batch_size, batch_size)

    @classmethod
    def fit(cls, points: Sequence[tuple[int, int, float]]) -> StepTime:
        """Least-squares fit to measured steps: (num_seqs, num_tokens, step_s) triples.

        Needs steps where num_tokens differs from num_seqs (some with prefill) to tell the two slopes
        apart; coefficients come out clamped at zero.
        """
        if len(points) < 3:
            raise ValueError("need at least three measured steps")
        design = np.array([[1.0, seqs, tokens] for seqs, tokens, _ in points])
        times = np.array([step_s for _, _, step_s in points])
        coef, *_ = np.linalg.lstsq(design, times, rcond=None)
        base, per_seq, per_token = (max(0.0, float(c)) for c in coef)
        return cls(base_s=max(base, 1e-6), per_seq_s=per_seq, per_token_s=per_token)

    @classmethod
    def from_benchmark(cls, decode: Sequence[tuple[int, float]], *, prefill_tokens_per_s: float) -> StepTime:
        """From what `fleetlm-dev bench serve` prints: TPOT at several fixed concurrencies, and prefill speed.

        `decode`: (concurrency, median TPOT seconds) pairs, e.g. from runs with `--max-concurrency 1, 8,
        32, 64` (at a fixed concurrency the running batch is about that size). `prefill_tokens_per_s`:
        prompt tokens per second on one replica, e.g. prompt length / (TTFT at concurrency 1).
        """
        if len(decode) < 2:
            raise ValueError("need TPOT at two or more concurrencies")
        sizes = np.array([size for size, _ in decode], dtype=float)
        tpots = np.array([tpot for _, tpot in decode], dtype=float)
        slope, intercept = np.polyfit(sizes, tpots, 1)
        per_token = 1.0 / prefill_tokens_per_s
        return cls(
            base_s=max(float(intercept), 1e-6),
            per_seq_s=max(0.0, float(slope) - per_token),
            per_token_s=per_token,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Calibration:
    name: str
    step: StepTime
    kv_capacity_tokens: int  # KV cache per replica, in tokens (prompt + output are reserved at admission)
    startup_s: float  # pod created -> ready (image start, model load, readiness probe)
    description: str

    def with_startup(self, startup_s: float) -> Calibration:
        return dataclasses.replace(self, startup_s=startup_s)


# Assumed: a mid-size model (about 8B, bf16) on one datacenter GPU under vLLM-like batching. Decode at
# batch 1 about 15 ms/token, +0.35 ms per extra sequence (batch 64 ~ 37 ms, batch 96 ~ 49 ms);
# prefill about 20k tokens/s; KV room for ~100k tokens. Start-up 15 s: one tuning interval, i.e. a
# warm start (image cached, weights on local disk or a sleeping instance woken up); cold GPU pods take
# 60-120 s, and `--startup-s` shows what that does to step recovery.
GPU_LIKE = Calibration(
    name="gpu",
    step=StepTime(base_s=0.015, per_seq_s=0.0003, per_token_s=0.00005),
    kv_capacity_tokens=100_000,
    startup_s=15.0,
    description="assumed mid-size model on one datacenter GPU (not measured); warm start 15 s",
)

# Assumed: the runtime's built-in tiny model on a few CPU cores with torch eager: per-step Python and
# operator overhead dominates (about 20 ms), each sequence adds about 0.5 ms. Start-up 8 s: process,
# torch import, tiny model built in memory, readiness probe.
CPU_TINY = Calibration(
    name="cpu-tiny",
    step=StepTime(base_s=0.020, per_seq_s=0.0005, per_token_s=0.0001),
    kv_capacity_tokens=50_000,
    startup_s=8.0,
    description="assumed built-in tiny model on CPU (not measured); start-up 8 s",
)

PROFILES = {profile.name: profile for profile in (GPU_LIKE, CPU_TINY)}


def from_engine_benchmark(
    report: dict[str, Any], *, model: str, kv_capacity_tokens: int = 50_000, startup_s: float = 8.0
) -> Calibration:
    """A calibration measured by `fleetlm-dev bench engine --json`: its full-decode step time per batch size.

    At a fixed concurrency the engine's full decode step *is* the time per output token at that batch
    size, so (concurrency, step) pairs give the per-step base and per-sequence slope. The engine packs
    prefill chunks and decodes into one forward, so a prompt token costs about what a decode row costs:
    the prefill rate is taken as 1 / slope.
    """
    entry = next((m for m in report.get("models", []) if m.get("model") == model), None)
    if entry is None:
        known = [m.get("model") for m in report.get("models", [])]
        raise ValueError(f"the benchmark report has no model {model!r} (it has {known})")
    decode = [
        (int(run["concurrency"]), float(run["full_decode_step_p50_ms"]) / 1e3)
        for run in entry.get("concurrency", [])
        if run.get("full_decode_step_p50_ms")
    ]
    if len(decode) < 2:
        raise ValueError(f"need full-decode step times at two or more concurrencies for {model!r}")
    sizes = np.array([size for size, _ in decode], dtype=float)
    steps = np.array([step for _, step in decode], dtype=float)
    slope = max(float(np.polyfit(sizes, steps, 1)[0]), 1e-7)
    step = StepTime.from_benchmark(decode, prefill_tokens_per_s=1.0 / slope)
    return Calibration(
        name=f"measured:{model}",
        step=step,
        kv_capacity_tokens=kv_capacity_tokens,
        startup_s=startup_s,
        description=f"measured by the engine benchmark on {report.get('cpu', 'this machine')} ({model})",
    )


# `fleetlm-dev bench engine --quick --json` on a 2-core x86_64 machine: (concurrency, full decode step ms).
# A recorded report, so the simulator's tests judge the bars on the same compute-bound engine everywhere.
TWO_CORE_TINY_STEPS_MS = ((1, 0.6228), (8, 0.941), (32, 1.7234), (64, 2.7574))


def measured_two_core_tiny() -> Calibration:
    """The calibration `from_engine_benchmark` makes of the recorded 2-core report of the built-in tiny model."""
    report = {
        "cpu": "2 CPUs, x86_64",
        "models": [
            {
                "model": "builtin:tiny",
                "concurrency": [{"concurrency": c, "full_decode_step_p50_ms": ms} for c, ms in TWO_CORE_TINY_STEPS_MS],
            }
        ],
    }
    return from_engine_benchmark(report, model="builtin:tiny")
