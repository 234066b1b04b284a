"""Requests that share a long prefix and arrive together compute it once: the later ones are admitted with a
hit on the blocks the first one's prefill is computing, in that very step (chunk by chunk when the prefix
exceeds a step's budget), and their greedy output is still `model.generate()`'s.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from fleetlm_runtime.engine import core
from fleetlm_runtime.engine import request as request_mod

BLOCK = 16


def _submit_together(engine: core.EngineCore, prompts: list[list[int]], max_tokens: int) -> tuple[dict, int, int]:
    """All prompts in one go, then step to the end: (tokens per request, prefill tokens computed, hit tokens)."""
    params = request_mod.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(engine.make_request(req_id=f"r{i}", prompt_token_ids=prompt, sampling_params=params))
        tokens[f"r{i}"] = []
    computed = hits = 0
    while engine.has_unfinished_requests():
        outs, stats = engine.step()
        if stats is not None:
            computed += stats.num_prefill_tokens
            hits += stats.prefix_cache_hits
        for out in outs:
            tokens[out.req_id].extend(out.new_token_ids)
    return tokens, computed, hits


@pytest.mark.parametrize(
    ("prefix_len", "max_batch_tokens"),
    [
        (160, 512),  # the whole prompt fits a step: the second is admitted in the same step as the first
        (160, 64),  # 10 blocks in chunks of 64: the second joins while the first's last chunk runs
        (150, 48),  # the prefix ends inside a block, chunks of 3 blocks
    ],
)
def test_two_requests_with_one_long_prefix_submitted_together_prefill_it_once(
    make_core: Callable[..., core.EngineCore],
    reference_model: object,
    generate_greedy: Callable[..., list[int]],
    prefix_len: int,
    max_batch_tokens: int,
) -> None:
    rng = random.Random(prefix_len + max_batch_tokens)
    prefix = [rng.randrange(1, 250) for _ in range(prefix_len)]
    prompts = [prefix + [rng.randrange(1, 250) for _ in range(8)] for _ in range(2)]
    engine = make_core(max_batch_size=4, max_batch_tokens=max_batch_tokens)
    got, computed, hits = _submit_together(engine, prompts, 6)
    shared = prefix_len // BLOCK * BLOCK  # the prefix's full blocks
    assert hits == shared  # the second request's; the first had nothing to hit
    assert computed == sum(len(p) for p in prompts) - shared  # the prefix's full blocks computed once
    for i, prompt in enumerate(prompts):
        assert got[f"r{i}"] == generate_greedy(reference_model, prompt, 6), f"r{i}"


def test_a_burst_of_eight_sharing_two_prefixes_computes_each_prefix_once(
    make_core: Callable[..., core.EngineCore],
    reference_model: object,
    generate_greedy: Callable[..., list[int]],
) -> None:
    rng = random.Random(4)
    prefixes = [[rng.randrange(1, 250) for _ in range(96)] for _ in range(2)]
    prompts = [prefixes[i % 2] + [rng.randrange(1, 250) for _ in range(rng.randint(1, 20))] for i in range(8)]
    engine = make_core(max_batch_size=8, max_batch_tokens=80)
    got, computed, hits = _submit_together(engine, prompts, 5)
    assert hits == 6 * 96  # all but the first of each prefix hit all of its 6 blocks
    assert computed == sum(len(p) for p in prompts) - 6 * 96
    for i, prompt in enumerate(prompts):
        assert got[f"r{i}"] == generate_greedy(reference_model, prompt, 5), f"r{i}"
