"""Logits -> next tokens for a whole batch at once (torch), with per-request parameters.

Greedy rows take an argmax. Sampled rows go through temperature, top-k, top-p and inverse-CDF sampling:
one cumulative sum and one `searchsorted` for the batch, fed by one uniform number per row. Each request
draws its uniforms from its own `random.Random`, seeded from `SamplingParams.seed` when given, so a
seeded request yields the same tokens whatever else shares its batch, and no torch generator (slow to
call per row) is needed. This module decides tokens only; stopping is the scheduler's job.

Requests that ask for more (log-probabilities, penalties, logit_bias) take a second path, and only they:
`sample()` keeps the plain path above when no row of the batch needs it. Logits are processed in fp32 as
OpenAI and vLLM define it: logit_bias added, then the repetition penalty (vLLM/HF: prompt and output tokens'
logits divided by it when positive, multiplied when negative), then the frequency penalty (times the
token's count in the output) and the presence penalty (once for any token in the output), subtracted.
Temperature, top-k and top-p follow; greedy rows take the argmax of the processed logits. The output
counts are kept per request, on the device, updated by one scatter per step. Log-probabilities are of the
raw distribution (the model's logits, log-softmax in fp32), vLLM's default: the sampled token's and the top
`logprobs` alternatives (ties in index order, as torch.topk gives them).

Constrained rows (structured outputs) take the second path too: before anything else, each one's grammar
matcher fills its row of one batch bitmask and the mask sets every token its grammar does not allow to
-inf, in place, in those rows only (`structured/mask.py`); after picking, each matcher takes its row's
token. Their log-probabilities are then of the masked distribution, as vLLM's are.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from fleetlm_runtime.engine import request as request_mod

if TYPE_CHECKING:
    from fleetlm_runtime.structured import grammar as grammar_mod
    from fleetlm_runtime.structured import mask as mask_mod

logger = logging.getLogger(__name__)

# Per sampled row: None, or (the sampled token's logprob, [(token id, logprob)] for the top alternatives).
Logprobs = tuple[float, list[tuple[int, float]]]


@dataclass(slots=True)
class SamplingState:
    """Per-request sampling state kept by the runner for the life of the request."""

    greedy: bool
    temperature: float
    top_p: float
    top_k: int  # 0 = disabled
    rng: random.Random
    params: request_mod.SamplingParams = field(default_factory=request_mod.SamplingParams)
    # Only for requests that process logits: output token counts [vocab] (fp32), prompt tokens [vocab]
    # (bool, repetition penalty only), bias [vocab] (fp32, logit_bias only); on the logits' device.
    counts: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    prompt_token_ids: list[int] = field(default_factory=list)  # kept for the repetition penalty, prompt logprobs
    # Prompt logprobs so far (prompt_logprobs requests): one entry per prompt token, None for the first.
    prompt_logprobs: list[Logprobs | None] | None = None
    prompt_logprobs_sent: bool = False
    # Structured output: the grammar matcher, advanced by every token sampled (and kept through preemption).
    grammar: grammar_mod.Matcher | None = None

    @classmethod
    def from_params(
        cls,
        params: request_mod.SamplingParams,
        *,
        fallback_rng: random.Random,
        prompt_token_ids: Sequence[int] = (),
    ) -> SamplingState:
        # Unseeded requests still get their own stream, seeded from the engine's RNG, so that adding a
        # seeded request to a batch never shifts the random numbers of the others.
        seed = params.seed if params.seed is not None else fallback_rng.getrandbits(63)
        return cls(
            greedy=params.greedy,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            rng=random.Random(seed),
            params=params,
            prompt_token_ids=list(prompt_token_ids)
            if params.repetition_penalty != 1.0 or params.prompt_logprobs is not None
            else [],
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
        )

    def add_prompt_logprobs(self, start: int, logits: torch.Tensor) -> None:
        """`logits` [n, vocab] of prompt positions start..start+n-1, each predicting the next prompt token.
        Positions already seen (a recompute after preemption) are skipped."""
        assert self.prompt_logprobs is not None
        targets = self.prompt_token_ids[start + 1 : start + 1 + logits.shape[0]]
        if start + 1 != len(self.prompt_logprobs) or not targets:
            return
        logprobs = logits[: len(targets)].float().log_softmax(dim=-1)
        ids = torch.tensor(targets, device=logits.device).unsqueeze(1)
        chosen = logprobs.gather(1, ids).squeeze(1).tolist()
        k = self.params.prompt_logprobs or 0
        tops: list[list[tuple[int, float]]] = [[] for _ in targets]
        if k:
            top = logprobs.topk(min(k, logprobs.shape[1]), dim=-1)
            tops = [
                list(zip(i, v, strict=True)) for i, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)
            ]
        self.prompt_logprobs.extend(zip(chosen, tops, strict=True))

    @property
    def special(self) -> bool:
        """Needs the second path: log-probabilities, processed logits or a grammar."""
        return self.params.logprobs is not None or self.params.processes_logits or self.params.constraint is not None

    def _tensors(self, vocab: int, device: torch.device) -> None:
        """Made on the request's first sampled step, when the vocabulary and device are known."""
        self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        params = self.params
        if params.repetition_penalty != 1.0:
            mask = torch.zeros(vocab, dtype=torch.bool, device=device)
            ids = [t for t in self.prompt_token_ids if t < vocab]
            if ids:
                mask[torch.tensor(ids, device=device)] = True
            self.prompt_mask = mask
        if params.logit_bias:
            bias = torch.zeros(vocab, dtype=torch.float32, device=device)
            biased = torch.tensor([t for t, _ in params.logit_bias], device=device)
            bias[biased] = torch.tensor([b for _, b in params.logit_bias], device=device)
            self.bias = bias


def apply_penalties(
    logits: torch.Tensor,
    *,
    counts: torch.Tensor,
    prompt_mask: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
    repetition: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """Processed logits [rows, vocab] (fp32) from raw ones; every other argument is per row ([rows, vocab]
    or [rows, 1]). The formulas are OpenAI's (presence, frequency, logit_bias) and vLLM's (repetition)."""
    logits = logits + bias
    seen = prompt_mask | (counts > 0)
    penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalised, logits)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def sample(
    logits: torch.Tensor, states: Sequence[SamplingState], *, all_greedy: bool, any_special: bool = False
) -> tuple[list[int], list[Logprobs | None] | None]:
    """One token per row of `logits` [num_rows, vocab]; `states` aligns with the rows. Returns the tokens
    and, when some row asked for them, the log-probabilities per row (None for rows that did not)."""
    if any_special:
        special = [i for i, state in enumerate(states) if state.special]
        if special:
            return _sample_special(logits, states, special)
    if all_greedy:
        return logits.argmax(dim=-1).tolist(), None
    return _sample_plain(logits, states).tolist(), None


def _sample_plain(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    tokens = logits.argmax(dim=-1)
    rows = [i for i, state in enumerate(states) if not state.greedy]
    if rows:
        picked = [states[i] for i in rows]
        tokens[rows] = _sample_rows(logits[rows].float(), picked)
    return tokens


def _sample_special(
    raw: torch.Tensor, states: Sequence[SamplingState], special: list[int]
) -> tuple[list[int], list[Logprobs | None] | None]:
    vocab, device = raw.shape[1], raw.device
    constrained = [i for i in special if states[i].grammar is not None]
    if constrained:
        matchers = [states[i].grammar for i in constrained]
        _batch_mask().apply(raw, constrained, matchers)  # type: ignore[arg-type]
    processing = [i for i in special if states[i].params.processes_logits]
    logits = raw
    if processing:
        for i in processing:
            if states[i].counts is None:
                states[i]._tensors(vocab, device)
        picked = [states[i] for i in processing]
        no_prompt = torch.zeros(vocab, dtype=torch.bool, device=device)
        zeros = torch.zeros(vocab, dtype=torch.float32, device=device)
        counts = torch.stack([s.counts for s in picked])  # type: ignore[misc]

        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)

        processed = apply_penalties(
            raw[processing].float(),
            counts=counts,
            prompt_mask=torch.stack([s.prompt_mask if s.prompt_mask is not None else no_prompt for s in picked]),
            presence=column([s.params.presence_penalty for s in picked]),
            frequency=column([s.params.frequency_penalty for s in picked]),
            repetition=column([s.params.repetition_penalty for s in picked]),
            bias=torch.stack([s.bias if s.bias is not None else zeros for s in picked]),
        )
        logits = raw.float().clone()
        logits[processing] = processed
    tokens = _sample_plain(logits, states)
    if processing:
        rows = torch.tensor(processing, device=device)
        for state, token in zip(picked, tokens[rows].tolist(), strict=True):
            state.counts[token] += 1  # type: ignore[index]
    token_list = tokens.tolist()
    for i in constrained:
        if not states[i].grammar.accept(token_list[i]):  # type: ignore[union-attr]
            # Only possible if the mask was not applied to this row; the request goes on unconstrained
            # rather than fail the batch, and the log says so.
            logger.error("sampled token %d is outside its grammar; the grammar is dropped", token_list[i])
            states[i].grammar = None
    wanting = [i for i in special if states[i].params.logprobs is not None]
    if not wanting:
        return token_list, None
    result: list[Logprobs | None] = [None] * len(states)
    logprobs = raw[wanting].float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens[wanting].unsqueeze(1)).squeeze(1).tolist()
    k = max(states[i].params.logprobs or 0 for i in wanting)
    top_values: list[list[float]] = [[] for _ in wanting]
    top_ids: list[list[int]] = [[] for _ in wanting]
    if k:
        top = logprobs.topk(min(k, vocab), dim=-1)
        top_values, top_ids = top.values.tolist(), top.indices.tolist()
    for j, i in enumerate(wanting):
        n = states[i].params.logprobs or 0
        result[i] = (chosen[j], list(zip(top_ids[j][:n], top_values[j][:n], strict=True)))
    return token_list, result


_MASK: mask_mod.BatchMask | None = None


def _batch_mask() -> mask_mod.BatchMask:
    """The process's bitmask buffer, made on the first constrained step (xgrammar loads only then)."""
    global _MASK  # noqa: PLW0603 - one reusable buffer per engine process
    if _MASK is None:
        from fleetlm_runtime.structured import mask as mask_mod  # noqa: PLC0415

        _MASK = mask_mod.BatchMask()
    return _MASK


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
