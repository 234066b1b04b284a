"""Prefix cache: shared prompt prefixes reuse KV, greedy output is unchanged, memory is bounded, LRU evicts.

The index (pure Python) is tested alone; the engine tests run the tiny model and compare every output
with `model.generate()` on the request alone.
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


def test_index_is_bounded_and_evicts_least_recently_used_tails_first() -> None:
    index = prefix_cache.PrefixCacheIndex(max_tokens=64, block_size=16)  # 4 blocks
    first = prefix_cache.block_hashes(list(range(48)), 16)  # 3 blocks
    second = prefix_cache.block_hashes(list(range(100, 148)), 16)
    assert index.insert(first) == set(first)
    assert index.match(first) == 3
    assert index.take_evicted() == []
    index.insert(second)
    assert index.num_tokens <= index.max_tokens == 64
    evicted = index.take_evicted()
    # The older chain lost its tail, not its root: a shorter prefix of it still hits.
    assert evicted == [first[2], first[1]]
    assert index.match(first) == 1
    assert index.match(second) == 3
    # Touching moves a chain to the most recently used end.
    index.match(first)
    index.insert(prefix_cache.block_hashes(list(range(200, 216)), 16))
    assert index.take_evicted() == [second[2]]
    assert index.insert(first[:1]) == set()


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
    # Index and KV copies agree, and the request slots were all released.
    assert engine.runner.num_prefix_blocks == engine.scheduler.prefix_cache.num_blocks  # type: ignore[union-attr]
    assert engine.runner.num_slots == 0


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


def test_memory_bound_holds_and_eviction_keeps_index_and_copies_in_step(
    make_core: Callable[..., core.EngineCore],
    reference_model: object,
    generate_greedy: Callable[..., list[int]],
) -> None:
    rng = random.Random(3)
    engine = make_core(max_batch_size=4, max_batch_tokens=64, prefix_cache_max_tokens=64)  # 4 blocks of 16
    cache = engine.scheduler.prefix_cache
    assert cache is not None
    prompts = [[rng.randrange(1, 250) for _ in range(40)] for _ in range(12)]  # 2 full blocks each
    got = _run(engine, prompts, 4, stagger=True)
    assert cache.num_tokens <= 64
    assert engine.runner.num_prefix_blocks == cache.num_blocks <= 4
    # The last prompts are still cached; repeating the most recent one hits, the oldest misses.
    again = _run(engine, [prompts[-1]], 4, stagger=True)
    assert sum(s.prefix_cache_hits for s in engine.stats_seen) == 32  # type: ignore[attr-defined]
    assert again["r0"] == got["r11"] == generate_greedy(reference_model, prompts[-1], 4)
    again = _run(engine, [prompts[0]], 4, stagger=True)
    assert sum(s.prefix_cache_hits for s in engine.stats_seen) == 0  # type: ignore[attr-defined]  (evicted)
    assert again["r0"] == generate_greedy(reference_model, prompts[0], 4)
    assert engine.runner.num_prefix_blocks == cache.num_blocks <= 4


def test_disabled_cache_counts_nothing(make_core: Callable[..., core.EngineCore]) -> None:
    engine = make_core(prefix_cache_max_tokens=0)
    assert engine.scheduler.prefix_cache is None
    prompt = list(range(1, 50))
    _run(engine, [prompt, prompt], 3, stagger=True)
    assert sum(s.prefix_cache_queries + s.prefix_cache_hits for s in engine.stats_seen) == 0  # type: ignore[attr-defined]
    assert engine.runner.num_prefix_blocks == 0
