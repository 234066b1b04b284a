"""The KV block pool and its manager, alone: allocation, reference counts, lazy LRU eviction of free
cached blocks, prefix sharing without copies, and the pool-size rules. Pure Python, no model."""

from __future__ import annotations

import pytest

from fleetlm_runtime.caches import block_pool, kv_budget, kv_manager, prefix_cache
from fleetlm_runtime.engine import request as request_mod


def make_request(req_id: str, prompt: list[int], max_tokens: int = 8) -> request_mod.Request:
    req = request_mod.resolve_request(
        req_id=req_id,
        prompt_token_ids=prompt,
        sampling_params=request_mod.SamplingParams(max_tokens=max_tokens, temperature=0.0),
        max_model_len=4096,
        vocab_size=1000,
        eos_token_ids=frozenset({0}),
        arrival_time_s=0.0,
    )
    req.block_hashes = prefix_cache.block_hashes(prompt, 4)
    return req


def test_blocks_are_handed_out_and_returned_and_the_null_block_never_is() -> None:
    pool = block_pool.BlockPool(num_blocks=5)
    assert (pool.num_usable_blocks, pool.num_free_blocks, pool.usage) == (4, 4, 0.0)
    got = pool.get_new_blocks(4)
    assert sorted(got) == [1, 2, 3, 4] and block_pool.NULL_BLOCK not in got
    assert pool.usage == 1.0
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)
    pool.free_blocks(got)
    assert pool.num_free_blocks == 4 and all(pool.ref_cnt[b] == 0 for b in got)


def test_shared_blocks_stay_until_their_last_holder_frees_them() -> None:
    pool = block_pool.BlockPool(num_blocks=4)
    (block,) = pool.get_new_blocks(1)
    assert pool.cache_block(block, b"h")
    pool.touch([block])  # a second holder (a prefix hit)
    assert pool.ref_cnt[block] == 2
    pool.free_blocks([block])
    assert pool.num_free_blocks == 2 and pool.get_cached_block(b"h") == block
    pool.free_blocks([block])
    assert pool.num_free_blocks == 3 and pool.get_cached_block(b"h") == block  # free, and still cached


def test_free_cached_blocks_are_evicted_lazily_plain_ones_first_then_least_recently_used() -> None:
    pool = block_pool.BlockPool(num_blocks=5)
    a, b, c, d = pool.get_new_blocks(4)
    pool.cache_block(a, b"a")
    pool.cache_block(b, b"b")
    pool.free_blocks([b, a])  # freed tail first: b is evicted before a
    pool.free_blocks([c])  # plain: reused before any cached block
    assert pool.get_new_blocks(1) == [c]
    assert pool.get_cached_block(b"a") == a and pool.get_cached_block(b"b") == b
    assert pool.get_new_blocks(1) == [b]  # evicted now, when the memory is needed
    assert pool.get_cached_block(b"b") is None and pool.get_cached_block(b"a") == a
    pool.touch([a])  # a hit on a free cached block takes it out of the free queue
    assert pool.num_free_blocks == 0 and pool.ref_cnt[a] == 1
    del d


def test_the_index_bound_forgets_the_least_recently_used_hash() -> None:
    pool = block_pool.BlockPool(num_blocks=8, max_cached_blocks=2)
    blocks = pool.get_new_blocks(3)
    for block, name in zip(blocks, (b"x", b"y", b"z"), strict=True):
        pool.cache_block(block, name)
    assert pool.num_cached_blocks == 2 and pool.get_cached_block(b"x") is None
    assert pool.reset_prefix_cache() == 2 and pool.num_cached_blocks == 0


def test_the_manager_allocates_by_tokens_held_and_shares_a_prefix_without_copying() -> None:
    kv = kv_manager.KVCacheManager(num_blocks=9, block_size=4, enable_caching=True)  # 8 usable
    prompt = list(range(1, 11))  # 10 tokens: 2 full blocks and 2 tokens
    a = make_request("a", prompt)
    assert kv.get_computed_blocks(a) == []
    assert len(kv.allocate_slots(a, 10) or []) == 3
    kv.cache_blocks(a, 10)
    a.num_computed_tokens = 10
    assert kv.allocate_slots(a, 1) == []  # the 11th token fits the third block
    a.num_computed_tokens = 11
    assert len(kv.allocate_slots(a, 2) or []) == 1  # the 13th needs a fourth
    b = make_request("b", prompt)
    hit = kv.get_computed_blocks(b)
    assert hit == kv.block_ids("a")[:2]
    new = kv.allocate_slots(b, 2, hit)  # 8 cached tokens, 2 to compute
    assert new is not None and len(new) == 1 and kv.block_ids("b")[:2] == hit
    assert kv.num_used_blocks == 5  # 4 + 1: the two shared blocks count once
    c = make_request("c", list(range(50, 90)), max_tokens=1)
    assert kv.allocate_slots(c, 40) is None and kv.num_blocks_held("c") == 0  # 10 blocks do not fit
    assert kv.free("a") == 4 and kv.num_used_blocks == 3  # b still holds the shared ones
    assert kv.free("b") == 3 and kv.num_used_blocks == 0 and kv.usage == 0.0
    assert kv.get_computed_blocks(make_request("d", prompt)) == hit  # still cached after both left


def test_the_pool_size_follows_the_budget_rules() -> None:
    per_block = kv_budget.block_bytes(num_layers=2, kv_heads=2, head_dim=16, block_size=16, dtype_bytes=4)
    assert per_block == 8192
    plan = kv_budget.plan
    size = plan(kv_budget.KVBudget(block_size=16, memory_bytes=1 << 20), bytes_per_block=per_block)
    assert (size.num_blocks, size.source) == (127, kv_budget.SOURCE_MEMORY)  # 128 less the null block
    size = plan(kv_budget.KVBudget(block_size=16, max_kv_tokens=100), bytes_per_block=per_block)
    assert (size.num_blocks, size.source) == (7, kv_budget.SOURCE_MAX_KV_TOKENS)
    size = plan(kv_budget.KVBudget(block_size=16, memory_bytes=1 << 20, max_kv_tokens=100), bytes_per_block=per_block)
    assert size.num_blocks == 7  # the token cap binds
    size = plan(kv_budget.KVBudget(block_size=16), bytes_per_block=per_block, gpu_free_for_kv=10 * per_block)
    assert (size.num_blocks, size.source) == (9, kv_budget.SOURCE_GPU)
    size = plan(kv_budget.KVBudget(block_size=16, max_useful_tokens=64 * 2048), bytes_per_block=per_block)
    assert (size.num_blocks, size.source) == (8192, kv_budget.SOURCE_CPU_DEFAULT)
    with pytest.raises(request_mod.InvalidParameterError) as info:
        plan(kv_budget.KVBudget(block_size=16, memory_bytes=per_block), bytes_per_block=per_block)
    assert info.value.param == "kv_cache_memory"
