"""Greedy output of every batched request equals `model.generate(do_sample=False)` on it alone.

Requests of mixed prompt lengths and max_tokens arrive at random steps, the token budget is small so
long prompts are prefilled in chunks next to running decodes (later chunks attend over their blocks in
the pool), and requests leave mid-batch, their blocks reused by others. Both forwards are checked: the
model's own modules and the lean Llama-family path.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from fleetlm_runtime.engine import core
from fleetlm_runtime.engine import request as request_mod


def run_with_random_arrivals(
    engine: core.EngineCore, requests: list[tuple[list[int], int]], *, seed: int
) -> tuple[dict[str, list[int]], dict[str, str]]:
    rng = random.Random(seed)
    pending = list(enumerate(requests))
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    max_batch = 0
    while pending or engine.has_unfinished_requests():
        # Between 0 and 3 arrivals before each step, so requests join a batch that is already running.
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            if pending:
                index, (prompt, max_tokens) = pending.pop(0)
                req = engine.make_request(
                    req_id=f"r{index}",
                    prompt_token_ids=prompt,
                    sampling_params=request_mod.SamplingParams(max_tokens=max_tokens, temperature=0.0),
                )
                engine.add_request(req)
                tokens[req.req_id] = []
        outputs, stats = engine.step()
        if stats is not None:
            max_batch = max(max_batch, stats.batch_size)
        for out in outputs:
            tokens[out.req_id].extend(out.new_token_ids)
            if out.finished:
                assert out.finish_reason is not None
                reasons[out.req_id] = out.finish_reason.value
    assert max_batch >= 8, "the test must actually batch requests"
    return tokens, reasons


@pytest.mark.parametrize(("fast_path", "num_requests"), [(True, 60), (False, 24)])
def test_greedy_equals_generate_with_random_arrivals(  # noqa: PLR0917 (pytest fixtures are positional)
    make_core: Callable[..., core.EngineCore],
    reference_model: object,
    generate_greedy: Callable[..., list[int]],
    random_prompts: Callable[..., list[list[int]]],
    fast_path: bool,
    num_requests: int,
) -> None:
    engine = make_core(max_batch_size=16, max_batch_tokens=64, fast_path=fast_path)
    assert engine.runner.forward_name == ("llama-fast" if fast_path else "modules")
    rng = random.Random(7)
    prompts = random_prompts(num_requests, vocab_size=engine.loaded.vocab_size, seed=11, max_len=300)
    requests = [(prompt, rng.randint(1, 48)) for prompt in prompts]
    got, reasons = run_with_random_arrivals(engine, requests, seed=3)
    for index, (prompt, max_tokens) in enumerate(requests):
        expected = generate_greedy(reference_model, prompt, max_tokens)
        assert got[f"r{index}"] == expected, f"request {index} (prompt {len(prompt)} tokens) differs"
        assert reasons[f"r{index}"] == ("stop" if expected[-1] in engine.loaded.eos_token_ids else "length")
    assert engine.kv_usage == 0.0 and engine.runner.num_requests == 0


def test_a_request_alone_equals_generate_over_a_long_context(
    make_core: Callable[..., core.EngineCore],
    reference_model: object,
    generate_greedy: Callable[..., list[int]],
    random_prompts: Callable[..., list[list[int]]],
) -> None:
    # 740 tokens: 47 blocks of 16, gathered by block table on every decode step.
    engine = make_core(max_batch_size=4, max_batch_tokens=256)
    prompt = random_prompts(1, vocab_size=engine.loaded.vocab_size, seed=5, min_len=700, max_len=700)[0]
    engine.add_request(
        engine.make_request(
            req_id="long",
            prompt_token_ids=prompt,
            sampling_params=request_mod.SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
        )
    )
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step()[0]:
            tokens.extend(out.new_token_ids)
    config = reference_model.generation_config  # type: ignore[attr-defined]
    original, config.eos_token_id = config.eos_token_id, None  # generate() without EOS, like ignore_eos
    try:
        assert tokens == generate_greedy(reference_model, prompt, 40)
    finally:
        config.eos_token_id = original
