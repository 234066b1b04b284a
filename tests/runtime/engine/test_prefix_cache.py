"""Prefix cache: shared prompt prefixes share KV blocks of the pool, greedy output is unchanged, the
index is bounded, LRU evicts, and a hit costs no prefill of the cached tokens.

The engine tests run the tiny model and compare every output with `model.generate()` on the request
alone; the block pool itself is tested in tests/runtime/caches.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from fleetlm_runtime.caches import prefix_cache
from fleetlm_runtime.engine import core
from fleetlm_runtime.engine import request as request_mod


def test_block_hashes_name_the_whole_prefix_and_only_full_blocks() -> None:
    a = prefix_cache.block_hashes([1, 2, 3, 4, 5, 6, 7], 2)
    b = prefix_cache.block_hashes([1, 2, 3, 4, 9, 9], 2)
    c = prefix_cache.block_hashes([9, 2, 3, 4], 2)
    assert len(a) == 3  # the 7th token is not a full block
    assert a[:2] == b[:2]
    assert a[2] != b[2]
    assert c[1] != a[1]  # same block tokens, different parent: different block
    assert prefix_cache.block_hashes([1, 2, 3, 4, 5, 6, 7], 2, start=2, parent=a[1]) == a[2:]  # resumable chain


def _run(engine: core.EngineCore, prompts: list[list[int]], max_tokens: int, *, stagger: bool) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    stats_seen = []
    while pending or engine.has_unfinished_requests():
        for _ in range(1 if stagger else len(pending)):
            if pending:
                i, prompt = pending.pop(0)
                engine.add_request(
                    engine.make_request(
                        req_id=f"r{i}",
                        prompt_token_ids=prompt,
                        sampling_params=request_mod.SamplingParams(max_tokens=max_tokens, temperature=0.0),
                    )
                )
                tokens[f"r{i}"] = []
        outs, stats = engine.step()
        if stats is not None:
            stats_seen.append(stats)
        for out in outs:
            tokens[out.req_id].extend(out.new_token_ids)
    engine.stats_seen = stats_seen  # type: ignore[attr-defined]
    return tokens


def test_shared_prefix_hits_and_greedy_output_is_identical_to_generate(
    make_core: Callable[..., core.EngineCore],
    reference_model: object,
    generate_greedy: Callable[..., list[int]],
) -> None:
    rng = random.Random(7)
    system = [rng.randrange(1, 250) for _ in range(70)]  # 4 full blocks of 16, plus 6 tokens
    prompts = [system + [rng.randrange(1, 250) for _ in range(rng.randint(1, 30))] for _ in range(10)]
    prompts += [system[:64], system[:65], [*system[:16], 5, 6, 7]]  # ends on, just past, and inside blocks
    engine = make_core(max_batch_size=8, max_batch_tokens=48, prefix_cache_max_tokens=1024)
    got = _run(engine, prompts, 12, stagger=True)
    for i, prompt in enumerate(prompts):
        assert got[f"r{i}"] == generate_greedy(reference_model, prompt, 12), f"r{i}"
    queries = sum(s.prefix_cache_queries for s in engine.stats_seen)  # type: ignore[attr-defined]
    hits = sum(s.prefix_cache_hits for s in engine.stats_seen)  # type: ignore[attr-defined]
    assert queries == sum(len(p) for p in prompts)
    # Every request after the first finds at least the system prompt's first block.
    assert hits >= 16 * (len(prompts) - 1)
    assert hits % 16 == 0
    # Every request gave its blocks back; the cached ones stay in the pool, free until reused or evicted.
    assert engine.runner.num_requests == 0 and engine.scheduler.kv.num_used_blocks == 0
    assert engine.scheduler.kv.pool.num_cached_blocks >= 4


def test_output_is_the_same_with_and_without_the_cache_when_batched_together(
    make_core: Callable[..., core.EngineCore],
) -> None:
    rng = random.Random(11)
    system = [rng.randrange(1, 250) for _ in range(48)]
    prompts = [system + [rng.randrange(1, 250) for _ in range(rng.randint(1, 20))] for _ in range(8)]
    on = _run(make_core(max_batch_size=8, max_batch_tokens=64), prompts * 2, 10, stagger=False)
    no_cache = make_core(max_batch_size=8, max_batch_tokens=64, prefix_cache_max_tokens=0)
    off = _run(no_cache, prompts * 2, 10, stagger=False)
    assert on == off


def test_the_index_bound_holds_and_least_recently_used_blocks_leave_it(
    make_core: Callable[..., core.EngineCore],
    reference_model: object,
    generate_greedy: Callable[..., list[int]],
) -> None:
    rng = random.Random(3)
    engine = make_core(max_batch_size=4, max_batch_tokens=64, prefix_cache_max_tokens=64)  # 4 blocks of 16
    cache = engine.scheduler.kv.pool
    prompts = [[rng.randrange(1, 250) for _ in range(40)] for _ in range(12)]  # 2 full blocks each
    got = _run(engine, prompts, 4, stagger=True)
    assert cache.num_cached_blocks <= 4
    # The last prompts are still cached; repeating the most recent one hits, the oldest misses.
    again = _run(engine, [prompts[-1]], 4, stagger=True)
    assert sum(s.prefix_cache_hits for s in engine.stats_seen) == 32  # type: ignore[attr-defined]
    assert again["r0"] == got["r11"] == generate_greedy(reference_model, prompts[-1], 4)
    again = _run(engine, [prompts[0]], 4, stagger=True)
    assert sum(s.prefix_cache_hits for s in engine.stats_seen) == 0  # type: ignore[attr-defined]  (evicted)
    assert again["r0"] == generate_greedy(reference_model, prompts[0], 4)
    assert cache.num_cached_blocks <= 4


def test_disabled_cache_counts_nothing(make_core: Callable[..., core.EngineCore]) -> None:
    engine = make_core(prefix_cache_max_tokens=0)
    assert not engine.scheduler.kv.enable_caching
    prompt = list(range(1, 50))
    _run(engine, [prompt, prompt], 3, stagger=True)
    assert sum(s.prefix_cache_queries + s.prefix_cache_hits for s in engine.stats_seen) == 0  # type: ignore[attr-defined]
    assert engine.scheduler.kv.pool.num_cached_blocks == 0


def test_a_hit_shares_the_cached_blocks_and_prefills_only_the_rest(
    make_core: Callable[..., core.EngineCore],
    reference_model: object,
    generate_greedy: Callable[..., list[int]],
) -> None:
    rng = random.Random(5)
    prompt = [rng.randrange(1, 250) for _ in range(40)]  # two full blocks of 16, then 8 tokens
    engine = make_core(max_batch_size=4, max_batch_tokens=64)
    first = _run(engine, [prompt], 6, stagger=True)
    kv = engine.scheduler.kv
    hashes = prefix_cache.block_hashes(prompt, 16)
    cached = [kv.pool.get_cached_block(h) for h in hashes]
    assert None not in cached and kv.num_used_blocks == 0  # free, still cached
    params = request_mod.SamplingParams(max_tokens=6, temperature=0.0)
    engine.add_request(engine.make_request(req_id="again", prompt_token_ids=prompt, sampling_params=params))
    outs, stats = engine.step()
    assert stats is not None
    assert (stats.prefix_cache_hits, stats.num_prefill_tokens, stats.num_tokens) == (32, 8, 8)  # no prefill of 32
    assert engine.runner._tables["again"][:2] == cached  # the very blocks, not copies
    tokens = [t for o in outs for t in o.new_token_ids]
    while engine.has_unfinished_requests():
        tokens += [t for o in engine.step()[0] for t in o.new_token_ids]
    assert tokens == first["r0"] == generate_greedy(reference_model, prompt, 6)
