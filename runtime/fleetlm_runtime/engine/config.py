"""The engine's own settings: which model, which limits. Validated on construction, errors name the field.

The runtime's pydantic `RuntimeConfig` (owned by the server side) maps onto this; the engine depends on
nothing above it. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetlm_runtime.engine import queues
from fleetlm_runtime.engine import request as request_mod


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    model: str = "builtin:tiny"  # builtin:tiny, builtin:small, or a local safetensors directory
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16
    device: str = "cpu"  # or "cuda", "cuda:1", "auto" (CUDA when torch sees a GPU, else the CPU)
    max_model_len: int | None = None  # None: the model's context length
    max_batch_size: int = 64  # running sequences
    max_batch_tokens: int = 512  # tokens per step (prefill chunks + decodes)
    # The KV pool, allocated once at start (see caches/kv_budget.py for the rules): `kv_cache_memory` bytes
    # when set; else `max_kv_tokens` tokens when set (with both, the smaller); else on a GPU
    # `gpu_memory_utilization` of its memory less the weights and a profiled activation peak; else (CPU)
    # 2 GiB, at most max_batch_size sequences of the full context.
    max_kv_tokens: int | None = None
    kv_cache_memory: int | None = None  # bytes
    gpu_memory_utilization: float = 0.9
    kv_block_size: int = 16  # tokens per KV block: the unit of allocation and of prefix sharing
    scheduling_policy: queues.SchedulingPolicy = "priority"
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's default
    seed: int = 0  # seeds the streams of requests that give no seed of their own
    fast_path: bool = True  # the lean Llama-family forward where it applies (checked against the modules)
    # Prefix cache: full prompt blocks of the pool stay indexed by their chain hash, and later prompts
    # sharing the prefix share those blocks. None: bounded by the pool only (free cached blocks are evicted,
    # least recently used first, when blocks are needed); N: at most N tokens of blocks indexed; 0: off.
    prefix_cache_max_tokens: int | None = None
    # Priority policy only: a waiting request gains one priority level per `priority_aging_s` seconds of
    # waiting (None: strict priority, lower classes may starve), and a higher class that finds the batch
    # or the KV full preempts (recompute) the lowest-priority, most recently admitted running request.
    priority_aging_s: float | None = 30.0  # as the runtime config's qos.priorityAgingS, which says why
    enable_preemption: bool = True
    # Structured outputs: build the grammar library's tokenizer tables (about 0.8 s with its import for a 49k
    # vocabulary) at start, beside the pool's allocation, rather than between the steps around the first
    # constrained request, which would stall every running stream that long. Off by default: tests and
    # tools that never send a schema should not pay for it; the server's engine process turns it on.
    prepare_grammars: bool = False

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_batch_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise request_mod.InvalidParameterError(name, f"must be an integer >= 1, got {value!r}")
        for name in ("max_model_len", "max_kv_tokens", "num_threads", "kv_cache_memory"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise request_mod.InvalidParameterError(name, f"must be None or an integer >= 1, got {value!r}")
        if self.max_batch_tokens < self.max_batch_size:
            raise request_mod.InvalidParameterError(
                "max_batch_tokens", f"must be >= max_batch_size ({self.max_batch_size}), got {self.max_batch_tokens}"
            )
        if not isinstance(self.kv_block_size, int) or not 1 <= self.kv_block_size <= 256:
            raise request_mod.InvalidParameterError(
                "kv_block_size", f"must be an integer in [1, 256], got {self.kv_block_size!r}"
            )
        util = self.gpu_memory_utilization
        if isinstance(util, bool) or not isinstance(util, int | float) or not 0 < util <= 1:
            raise request_mod.InvalidParameterError("gpu_memory_utilization", f"must be in (0, 1], got {util!r}")
        cache_tokens = self.prefix_cache_max_tokens
        if cache_tokens is not None and (not isinstance(cache_tokens, int) or cache_tokens < 0):
            raise request_mod.InvalidParameterError(
                "prefix_cache_max_tokens",
                f"must be None (the pool), 0 (off) or a positive integer, got {cache_tokens!r}",
            )
        if cache_tokens and cache_tokens < self.kv_block_size:
            raise request_mod.InvalidParameterError(
                "prefix_cache_max_tokens",
                f"must be 0 (off) or hold one block of {self.kv_block_size} tokens, got {self.prefix_cache_max_tokens}",
            )
        aging = self.priority_aging_s
        if aging is not None and (isinstance(aging, bool) or not isinstance(aging, int | float) or not aging > 0):
            raise request_mod.InvalidParameterError("priority_aging_s", f"must be None or > 0, got {aging!r}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise request_mod.InvalidParameterError(
                "scheduling_policy", f"must be 'fcfs' or 'priority', got {self.scheduling_policy!r}"
            )
