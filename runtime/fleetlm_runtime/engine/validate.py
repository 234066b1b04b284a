"""Requests validated against an engine's `EngineInfo`: pure, and free of torch.

The server validates in its own process (a 400 naming the parameter) before a request crosses to the
engine core, which may run in another process; the core uses the same function for direct callers.
"""

from __future__ import annotations

from collections.abc import Sequence

from fleetlm_runtime.engine import outputs
from fleetlm_runtime.engine import request as request_mod


def make_request(
    info: outputs.EngineInfo,
    *,
    req_id: str,
    prompt_token_ids: Sequence[int],
    sampling_params: request_mod.SamplingParams,
    arrival_time_s: float,
    qos_class: str = "default",
    priority: int = 0,
    weight: float = 1.0,
    tenant: str = "",
) -> request_mod.Request:
    """A request validated against the model and the KV capacity.

    Raises InvalidParameterError naming the parameter (prompt too long, max_tokens over the context).
    """
    req = request_mod.resolve_request(
        req_id=req_id,
        prompt_token_ids=prompt_token_ids,
        sampling_params=sampling_params,
        max_model_len=info.max_model_len,
        vocab_size=info.vocab_size,
        eos_token_ids=info.eos_token_ids,
        arrival_time_s=arrival_time_s,
        qos_class=qos_class,
        priority=priority,
        weight=weight,
        tenant=tenant,
    )
    if req.kv_reservation > info.kv_capacity_tokens:
        raise request_mod.InvalidParameterError(
            "max_tokens",
            f"prompt + max_tokens = {req.kv_reservation} tokens exceeds the engine's KV capacity of "
            f"{info.kv_capacity_tokens} tokens",
        )
    return req
