"""The KV pool is sized once at start from the budget (bytes, a token cap, or the CPU default), the
runtime config and `--kv-cache-memory` reach it, and the engine publishes what it allocated."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fleetlm_runtime import __main__ as cli
from fleetlm_runtime.caches import kv_budget
from fleetlm_runtime.engine import core
from fleetlm_runtime.engine import request as request_mod
from fleetlm_runtime.server import app

# builtin:tiny: 2 layers x 2 KV heads x 16 dims x (K and V) x 4 bytes = 512 bytes per token.
TINY_BYTES_PER_TOKEN = 512


def test_a_memory_budget_sizes_the_pool_in_whole_blocks(make_core: Callable[..., core.EngineCore]) -> None:
    engine = make_core(kv_cache_memory=1 << 20)
    info = engine.info
    block = 16 * TINY_BYTES_PER_TOKEN
    assert (info.kv_budget_source, info.kv_block_size) == (kv_budget.SOURCE_MEMORY, 16)
    assert info.kv_num_blocks == (1 << 20) // block - 1  # the null block is inside the budget
    assert info.kv_pool_bytes == (info.kv_num_blocks + 1) * block == engine.runner.pool_bytes <= 1 << 20
    assert info.kv_capacity_tokens == info.kv_num_blocks * 16 == engine.scheduler.kv.capacity_tokens
    assert info.weight_bytes == sum(p.numel() * 4 for p in engine.loaded.model.parameters()) + sum(
        b.numel() * b.element_size() for b in engine.loaded.model.buffers()
    )


def test_the_cpu_default_holds_every_sequence_of_the_batch_at_most(make_core: Callable[..., core.EngineCore]) -> None:
    engine = make_core(max_batch_size=4)
    info = engine.info
    assert info.kv_budget_source == kv_budget.SOURCE_CPU_DEFAULT
    assert info.kv_capacity_tokens == 4 * info.max_model_len  # well under 2 GiB for the tiny model


def test_a_token_cap_rounds_up_to_blocks_and_a_request_that_can_never_fit_is_refused(
    make_core: Callable[..., core.EngineCore],
) -> None:
    engine = make_core(max_kv_tokens=100, kv_block_size=8)
    assert (engine.info.kv_num_blocks, engine.info.kv_capacity_tokens) == (13, 104)
    with pytest.raises(request_mod.InvalidParameterError) as info:
        engine.make_request(
            req_id="big", prompt_token_ids=[5] * 50, sampling_params=request_mod.SamplingParams(max_tokens=60)
        )
    assert info.value.param == "max_tokens" and "104 tokens" in info.value.message


def test_the_command_line_and_the_runtime_config_reach_the_engine() -> None:
    args = cli.build_parser().parse_args(["--kv-cache-memory", "64Mi", "--max-kv-tokens", "4096"])
    cfg = cli.config_from_args(args)
    assert cfg.kv_cache.memory_bytes == 64 << 20
    engine_cfg = app.engine_config_from(cfg)
    assert (engine_cfg.kv_cache_memory, engine_cfg.max_kv_tokens, engine_cfg.kv_block_size) == (64 << 20, 4096, 16)
    assert engine_cfg.gpu_memory_utilization == cfg.kv_cache.gpu_memory_utilization
    assert engine_cfg.prefix_cache_max_tokens is None  # on, bounded by the pool
    bytes_args = cli.build_parser().parse_args(["--kv-cache-memory", "1048576", "--no-prefix-cache"])
    cfg = cli.config_from_args(bytes_args)
    assert cfg.kv_cache.memory_bytes == 1 << 20 and app.engine_config_from(cfg).prefix_cache_max_tokens == 0
