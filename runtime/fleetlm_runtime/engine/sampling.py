"""Logits -> next tokens for a whole batch at once (torch), with per-request parameters.

Greedy rows take an argmax. Sampled rows go through temperature, top-k, top-p and inverse-CDF sampling:
one cumulative sum and one `searchsorted` for the batch, fed by one uniform number per row. Each request
draws its uniforms from its own `random.Random`, seeded from `SamplingParams.seed` when given, so a
seeded request yields the same tokens whatever else shares its batch, and no torch generator (slow to
call per row) is needed. This module decides tokens only; stopping is the scheduler's job.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fleetlm_runtime.engine import request as request_mod


@dataclass(slots=True)
class SamplingState:
    """Per-request sampling state kept by the runner for the life of the request."""

    greedy: bool
    temperature: float
    top_p: float
    top_k: int  # 0 = disabled
    rng: random.Random

    @classmethod
    def from_params(cls, params: request_mod.SamplingParams, *, fallback_rng: random.Random) -> SamplingState:
        # Unseeded requests still get their own stream, seeded from the engine's RNG, so that adding a
        # seeded request to a batch never shifts the random numbers of the others.
        seed = params.seed if params.seed is not None else fallback_rng.getrandbits(63)
        return cls(
            greedy=params.greedy,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            rng=random.Random(seed),
        )


def sample(logits: torch.Tensor, states: Sequence[SamplingState], *, all_greedy: bool) -> list[int]:
    """One token per row of `logits` [num_rows, vocab]; `states` aligns with the rows."""
    if all_greedy:
        return logits.argmax(dim=-1).tolist()
    tokens = logits.argmax(dim=-1)
    rows = [i for i, state in enumerate(states) if not state.greedy]
    if rows:
        picked = [states[i] for i in rows]
        tokens[rows] = _sample_rows(logits[rows].float(), picked)
    return tokens.tolist()


def _sample_rows(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    vocab = logits.shape[1]
    device = logits.device
    temperature = torch.tensor([s.temperature for s in states], dtype=logits.dtype, device=device)
    logits = logits / temperature.unsqueeze(1)

    top_k = [s.top_k if 0 < s.top_k < vocab else vocab for s in states]
    if min(top_k) < vocab:
        # The k-th largest value per row is the threshold; ties at the threshold are kept (as vLLM does).
        k = torch.tensor(top_k, device=device).unsqueeze(1)
        values = logits.topk(max(top_k), dim=-1).values
        threshold = values.gather(1, k - 1)
        logits = logits.masked_fill(logits < threshold, float("-inf"))

    top_p = [s.top_p for s in states]
    if min(top_p) < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p; the top token always stays.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop = mass_before >= torch.tensor(top_p, dtype=logits.dtype, device=device).unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)

    cdf = logits.softmax(dim=-1).cumsum(dim=-1)
    uniforms = torch.tensor([s.rng.random() for s in states], dtype=cdf.dtype, device=device).unsqueeze(1)
    # Scale by the last cdf value so rounding can never push u past the end.
    choice = torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True)
    return choice.squeeze(1).clamp_(max=vocab - 1)
