"""How many KV blocks the pool gets: the budget rules, as pure arithmetic (the runner measures, this decides).

In order of precedence:

1. `memory` (`kvCache.memory`, bytes on any device): as many blocks as fit, the null block included;
   capped by `max_kv_tokens` when that is set too.
2. `max_kv_tokens` (`batching.maxKvTokens`) alone: exactly that many tokens, rounded up to whole blocks.
3. On a GPU: `gpu_memory_utilization` of the device's memory, less what the process already uses there
   (weights, the peak activations of a profiling forward at `max_batch_tokens`, and memory outside
   torch's allocator), as vLLM sizes its pool.
4. On the CPU: `DEFAULT_CPU_KV_MEMORY_BYTES` (2 GiB), but never more than `max_batch_size` sequences of
   the full context (beyond that no schedule could use it). 2 GiB is a fraction of any machine that
   serves models on its CPU, and holds 32K tokens of a 1B-parameter Llama in fp32 (64 KiB per token).
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetlm_runtime.engine import request as request_mod

DEFAULT_CPU_KV_MEMORY_BYTES = 2 << 30

SOURCE_MEMORY = "memory"
SOURCE_MAX_KV_TOKENS = "max_kv_tokens"
SOURCE_GPU = "gpu_memory_utilization"
SOURCE_CPU_DEFAULT = "cpu_default"


@dataclass(frozen=True, slots=True, kw_only=True)
class KVBudget:
    block_size: int
    memory_bytes: int | None = None
    max_kv_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    max_useful_tokens: int | None = None  # max_batch_size * max_model_len: the CPU default's cap


@dataclass(frozen=True, slots=True)
class PoolSize:
    num_blocks: int  # blocks requests can hold
    source: str  # which rule sized it (SOURCE_*)

    @property
    def num_blocks_with_null(self) -> int:
        return self.num_blocks + 1


def block_bytes(*, num_layers: int, kv_heads: int, head_dim: int, block_size: int, dtype_bytes: int) -> int:
    """Bytes of one block across all layers: a key and a value row per token, layer and KV head."""
    return 2 * num_layers * kv_heads * head_dim * block_size * dtype_bytes


def plan(budget: KVBudget, *, bytes_per_block: int, gpu_free_for_kv: int | None = None) -> PoolSize:
    """The pool's size. `gpu_free_for_kv`: bytes the GPU rule allows (None on the CPU)."""
    blocks_for_tokens = None if budget.max_kv_tokens is None else -(-budget.max_kv_tokens // budget.block_size)
    if budget.memory_bytes is not None:
        size = PoolSize(budget.memory_bytes // bytes_per_block - 1, SOURCE_MEMORY)
        if blocks_for_tokens is not None and blocks_for_tokens < size.num_blocks:
            size = PoolSize(blocks_for_tokens, SOURCE_MAX_KV_TOKENS)
    elif blocks_for_tokens is not None:
        size = PoolSize(blocks_for_tokens, SOURCE_MAX_KV_TOKENS)
    elif gpu_free_for_kv is not None:
        size = PoolSize(gpu_free_for_kv // bytes_per_block - 1, SOURCE_GPU)
    else:
        blocks = DEFAULT_CPU_KV_MEMORY_BYTES // bytes_per_block - 1
        if budget.max_useful_tokens is not None:
            blocks = min(blocks, -(-budget.max_useful_tokens // budget.block_size))
        size = PoolSize(blocks, SOURCE_CPU_DEFAULT)
    if size.num_blocks < 1:
        param = "kv_cache_memory" if size.source in (SOURCE_MEMORY, SOURCE_CPU_DEFAULT) else size.source
        raise request_mod.InvalidParameterError(
            param,
            f"the KV pool would hold no block of {budget.block_size} tokens ({bytes_per_block} bytes each, "
            "plus one null block); give it more memory",
        )
    return size
