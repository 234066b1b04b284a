"""Push what a running runtime takes live to every ready runtime pod's admin endpoint.

That is the batch limits, and the QoS section: the class table (priorities, weights, queue limits,
sheddable, the effective TTFT/TPOT targets), the default class, whether clients may name a class, and the
classes shed now. The runtime takes these without a restart (PUT /admin/config with the bearer token from
the LLMService's admin Secret) and swaps its class table at once. Pods that start later read the same
values from the ConfigMap, which holds the same rendered config. `live_body` cuts the push out of that
rendered config, so the two never disagree; `digest` names a body, so the tuner pushes each pod a body
once. Each pod's answer is reported; nothing here decides what to push.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import aiohttp

from fleetlm_runtime import contract


@dataclasses.dataclass(frozen=True, slots=True)
class PushResult:
    ok: tuple[str, ...]
    failed: Mapping[str, str]  # pod -> why


# The rendered config's fields a running runtime takes live (its admin API's `liveFields`, less the
# response cache, which is a spec change the operator rolls pods for).
LIVE_BATCHING = ("maxBatchSize", "maxBatchTokens")
LIVE_QOS = ("classes", "defaultClass", "allowClassHeader", "shedClasses")


def live_body(runtime_config: Mapping[str, Any]) -> dict[str, Any]:
    """The PUT /admin/config body for a rendered runtime config (builders.configmap.runtime_config)."""
    batching, qos = runtime_config["batching"], runtime_config["qos"]
    return {
        "batching": {name: batching[name] for name in LIVE_BATCHING},
        "qos": {name: qos.get(name, []) if name == "shedClasses" else qos[name] for name in LIVE_QOS},
    }


def digest(body: Mapping[str, Any]) -> str:
    """A short name for a body: equal bodies, equal digests, whatever the key order."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


async def push_tuning(
    endpoints: Mapping[str, str], *, token: str, body: Mapping[str, Any], timeout_s: float = 5.0
) -> PushResult:
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
    return PushResult(
        ok=tuple(pod for pod, error in results if error is None),
        failed={pod: error for pod, error in results if error is not None},
    )
