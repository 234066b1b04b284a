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
    device: str = "cpu"
    max_model_len: int | None = None  # None: the model's context length
    max_batch_size: int = 64  # running sequences
    max_batch_tokens: int = 512  # tokens per step (prefill chunks + decodes)
    max_kv_tokens: int | None = None  # KV capacity in tokens; None: max_batch_size * max_model_len
    scheduling_policy: queues.SchedulingPolicy = "priority"
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's default
    seed: int = 0  # seeds the streams of requests that give no seed of their own
    fast_path: bool = True  # the lean Llama-family forward where it applies (checked against the modules)

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_batch_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise request_mod.InvalidParameterError(name, f"must be an integer >= 1, got {value!r}")
        for name in ("max_model_len", "max_kv_tokens", "num_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise request_mod.InvalidParameterError(name, f"must be None or an integer >= 1, got {value!r}")
        if self.max_batch_tokens < self.max_batch_size:
            raise request_mod.InvalidParameterError(
                "max_batch_tokens", f"must be >= max_batch_size ({self.max_batch_size}), got {self.max_batch_tokens}"
            )
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise request_mod.InvalidParameterError(
                "scheduling_policy", f"must be 'fcfs' or 'priority', got {self.scheduling_policy!r}"
            )
