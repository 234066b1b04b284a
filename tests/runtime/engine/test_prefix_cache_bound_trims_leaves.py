"""A bounded prefix-cache index evicts chains from their leaves: the unique tail of each prompt (a
question after a shared system prompt) leaves before the shared prefix's first block, whose loss would
strand the whole chain (a lookup walks from the root and stops at the first miss).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from fleetlm_runtime.caches import block_pool, kv_manager, prefix_cache
from fleetlm_runtime.engine import core
from fleetlm_runtime.engine import request as request_mod


def test_the_pool_bound_evicts_the_tail_of_the_least_recent_chain_first() -> None:
    pool = block_pool.BlockPool(num_blocks=16, max_cached_blocks=4)
    root, mid, leaf, other = pool.get_new_blocks(4)
    hashes = prefix_cache.block_hashes(list(range(8)), 2)
    for block, block_hash in zip((root, mid, leaf), hashes[:3], strict=True):
        pool.cache_block(block, block_hash)
    pool.refresh([root, mid, leaf])
    pool.cache_block(other, b"another prompt's block")
    pool.touch([root, mid])  # a hit on the chain's first two blocks: the root ends most recent
    fifth = pool.get_new_blocks(1)[0]
    pool.cache_block(fifth, b"a fifth block")  # over the bound: the least recently used hash goes
    assert pool.get_cached_block(hashes[2]) is None  # the leaf, not the root
    assert pool.get_cached_block(hashes[0]) == root and pool.get_cached_block(hashes[1]) == mid


def _staggered(engine: core.EngineCore, prompts: list[list[int]], max_tokens: int) -> tuple[dict, int]:
    params = request_mod.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    hits = 0
    for i, prompt in enumerate(prompts):  # one at a time: every hit comes from the index, not a sibling
        engine.add_request(engine.make_request(req_id=f"r{i}", prompt_token_ids=prompt, sampling_params=params))
        tokens[f"r{i}"] = []
        while engine.has_unfinished_requests():
            outs, stats = engine.step()
            hits += stats.prefix_cache_hits if stats is not None else 0
            for out in outs:
                tokens[out.req_id].extend(out.new_token_ids)
    return tokens, hits


def test_two_system_prompts_stay_cached_while_unique_questions_churn_the_bound(
    make_core: Callable[..., core.EngineCore],
    reference_model: object,
    generate_greedy: Callable[..., list[int]],
) -> None:
    rng = random.Random(9)
    systems = [[rng.randrange(1, 250) for _ in range(64)] for _ in range(2)]  # 4 blocks of 16 each
    # Each question fills one more block (unique to its prompt) and 3 tokens past it.
    prompts = [systems[i % 2] + [rng.randrange(1, 250) for _ in range(19)] for i in range(12)]
    # Room for both system prompts and one block more: each request's question block pushes one out.
    engine = make_core(max_batch_size=4, max_batch_tokens=128, prefix_cache_max_tokens=9 * 16)
    got, hits = _staggered(engine, prompts, 4)
    assert hits == 10 * 64  # every request after the first of its system prompt finds all of it
    assert engine.scheduler.kv.pool.num_cached_blocks <= 9
    for i in (0, 5, 11):
        assert got[f"r{i}"] == generate_greedy(reference_model, prompts[i], 4), f"r{i}"


def test_a_chain_longer_than_the_bound_keeps_its_root_not_stranded_tail_blocks() -> None:
    kv = kv_manager.KVCacheManager(num_blocks=32, block_size=4, enable_caching=True, max_cached_blocks=3)
    req = request_mod.resolve_request(
        req_id="long",
        prompt_token_ids=list(range(1, 26)),  # 6 full blocks
        sampling_params=request_mod.SamplingParams(max_tokens=1, temperature=0.0),
        max_model_len=4096,
        vocab_size=100,
        eos_token_ids=frozenset({0}),
        arrival_time_s=0.0,
    )
    req.block_hashes = prefix_cache.block_hashes(req.prompt_token_ids, 4)
    assert kv.allocate_slots(req, 25) is not None
    kv.cache_blocks(req, 25)
    # Whatever the bound kept is reachable from the root: a lookup finds every cached block.
    probe = request_mod.resolve_request(
        req_id="probe",
        prompt_token_ids=list(range(1, 26)),
        sampling_params=request_mod.SamplingParams(max_tokens=1, temperature=0.0),
        max_model_len=4096,
        vocab_size=100,
        eos_token_ids=frozenset({0}),
        arrival_time_s=0.0,
    )
    probe.block_hashes = req.block_hashes
    assert len(kv.get_computed_blocks(probe)) == kv.pool.num_cached_blocks == 3  # the first three blocks
