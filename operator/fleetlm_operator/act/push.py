"""Push live tuning (batch limits, shed classes) to every ready runtime pod's admin endpoint.

The runtime takes these without a restart (PUT /admin/config with the bearer token from the
LLMService's admin Secret). Pods that start later read the same values from the ConfigMap, which the
tuner rewrites in the same tick. Each pod's answer is reported; nothing here decides what to push.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

from fleetlm_runtime import contract


@dataclasses.dataclass(frozen=True, slots=True)
class PushResult:
    ok: tuple[str, ...]
    failed: Mapping[str, str]  # pod -> why


def tuning_body(*, max_batch_size: int, max_batch_tokens: int, shed_classes: Sequence[str]) -> dict[str, Any]:
    return {
        "batching": {"maxBatchSize": max_batch_size, "maxBatchTokens": max_batch_tokens},
        "qos": {"shedClasses": list(shed_classes)},
    }


async def push_tuning(endpoints: Mapping[str, str], *, token: str, body: Mapping[str, Any],
                      timeout_s: float = 5.0) -> PushResult:
    """PUT `body` to each pod's /admin/config; `endpoints` maps pod name -> base URL."""
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:

        async def one(pod: str, base_url: str) -> tuple[str, str | None]:
            url = base_url.rstrip("/") + contract.PATH_ADMIN_CONFIG
            try:
                async with session.put(url, json=dict(body), headers=headers) as response:
                    if response.status == 200:
                        return pod, None
                    return pod, f"HTTP {response.status}: {(await response.text())[:300]}"
            except (aiohttp.ClientError, TimeoutError) as error:
                return pod, f"{type(error).__name__}: {error}"

        results = await asyncio.gather(*(one(pod, url) for pod, url in endpoints.items()))
    return PushResult(ok=tuple(pod for pod, error in results if error is None),
                      failed={pod: error for pod, error in results if error is not None})
