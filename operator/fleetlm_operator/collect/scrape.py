"""Scrape the runtime pods' /metrics directly (the default metrics source).

I/O only: fetch each ready pod's /metrics concurrently with a timeout and hand the body to
`collect.parse`. A pod that does not answer, answers with an error or with unparseable text is
reported by name and left out: its absence is missing data, never zero load.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping

import aiohttp

from fleetlm_operator.collect import parse
from fleetlm_operator.policy import window
from fleetlm_runtime import contract


@dataclasses.dataclass(frozen=True, slots=True)
class ScrapeResult:
    samples: dict[str, window.PodSample]  # pod name -> what it reported
    errors: dict[str, str]  # pod name -> why it is missing


async def scrape_pods(
    endpoints: Mapping[str, str], *, timeout_s: float = 5.0, session: aiohttp.ClientSession | None = None
) -> ScrapeResult:
    """`endpoints`: pod name -> base URL (http://<pod IP>:<port>). Scrapes all of them at once."""
    own_session = session is None
    client = session or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s))
    try:
        results = await asyncio.gather(
            *(_scrape_one(client, pod, url, timeout_s=timeout_s) for pod, url in endpoints.items())
        )
    finally:
        if own_session:
            await client.close()
    samples = {pod: sample for pod, sample, _ in results if sample is not None}
    errors = {pod: error for pod, _, error in results if error is not None}
    return ScrapeResult(samples=samples, errors=errors)


async def _scrape_one(
    client: aiohttp.ClientSession, pod: str, base_url: str, *, timeout_s: float
) -> tuple[str, window.PodSample | None, str | None]:
    url = base_url.rstrip("/") + contract.PATH_METRICS
    try:
        async with client.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            if response.status != 200:
                return pod, None, f"GET {url}: HTTP {response.status}"
            body = await response.text()
    except (aiohttp.ClientError, TimeoutError) as error:
        return pod, None, f"GET {url}: {type(error).__name__}: {error}"
    try:
        # Wall-clock time: counters' `_created` timestamps, which the window compares with, are wall time.
        return pod, parse.parse_pod_metrics(body, pod=pod, scraped_at_s=time.time()), None
    except parse.MetricsParseError as error:
        return pod, None, str(error)
