"""A load that needs about three times the KV pool: every request completes, greedy output equals
`generate()`, requests are preempted (recompute) when blocks run out, and the pool is the one allocated
at start (no KV tensor is allocated or moved afterwards). The 2,000-request memory run is in
`fleetlm-dev bench engine --overload`."""

from __future__ import annotations

import random
from collections.abc import Callable

from fleetlm_runtime.engine import core
from fleetlm_runtime.engine import request as request_mod


def test_three_times_the_pool_completes_exactly_and_the_pool_never_moves(
    make_core: Callable[..., core.EngineCore],
    reference_model: object,
    generate_greedy: Callable[..., list[int]],
) -> None:
    rng = random.Random(21)
    requests = [([rng.randrange(1, 800) for _ in range(rng.randint(8, 64))], rng.randint(8, 40)) for _ in range(200)]
    batch = 32
    # What the running batch would hold at its worst: 32 average requests (prompt + max_tokens).
    needed = batch * sum(len(p) + m for p, m in requests) // len(requests)
    engine = make_core(max_batch_size=batch, max_batch_tokens=256, max_kv_tokens=needed // 3)
    assert engine.info.kv_capacity_tokens < needed / 2.9
    pool = [(t.data_ptr(), t.shape) for t in engine.runner.pool_tensors]
    pool_bytes = engine.runner.pool_bytes
    for i, (prompt, max_tokens) in enumerate(requests):
        params = request_mod.SamplingParams(max_tokens=max_tokens, temperature=0.0)
        engine.add_request(engine.make_request(req_id=f"r{i}", prompt_token_ids=prompt, sampling_params=params))
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(requests))}
    finished: dict[str, str] = {}
    preemptions = peak_running = 0
    while engine.has_unfinished_requests():
        outs, stats = engine.step()
        assert stats is not None and stats.kv_blocks_used <= stats.kv_blocks_total
        preemptions += stats.num_preemptions
        peak_running = max(peak_running, stats.num_running)
        for out in outs:
            tokens[out.req_id].extend(out.new_token_ids)
            if out.finished:
                assert out.error is None and out.finish_reason is not None
                finished[out.req_id] = out.finish_reason.value
    assert len(finished) == len(requests) and set(finished.values()) <= {"stop", "length"}
    assert preemptions > 0, "the load must overflow the pool"
    assert peak_running > engine.info.kv_capacity_tokens // max(len(p) + m for p, m in requests)
    for i, (prompt, max_tokens) in enumerate(requests):
        assert tokens[f"r{i}"] == generate_greedy(reference_model, prompt, max_tokens), f"r{i}"
    assert [(t.data_ptr(), t.shape) for t in engine.runner.pool_tensors] == pool
    assert engine.runner.pool_bytes == pool_bytes == engine.info.kv_pool_bytes
    assert engine.kv_usage == 0.0 and engine.runner.num_requests == 0
