"""Each replica's own view of its load, read from its /metrics at a bounded cost.

Every `scrapeIntervalS` (default 0.5 s) the router GETs each ready replica's /metrics, at most one scrape
per replica at a time, each bounded by `scrapeTimeoutS` and `MAX_SCRAPE_BYTES`, and keeps three numbers
under the names an Inference Gateway endpoint picker reads (vLLM's, which `fleetlm-runtime` exports too,
so a vLLM replica works the same): queued and running requests and KV-cache usage 0-1. A failed scrape
keeps nothing new; the picker ignores a number older than `scrapeStaleS` (`picker.replica_loads`).

`parse_load` is pure; `LoadScraper.run` is the loop (one task for the router's lifetime).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping

import aiohttp

from fleetlm_router import endpoints as endpoints_mod
from fleetlm_router import picker
from fleetlm_runtime import contract

log = logging.getLogger(__name__)

MAX_SCRAPE_BYTES = 4 * 1024 * 1024  # a runtime's exposition is tens of KiB; past this it is not a runtime
_WAITING = contract.VLLM_NUM_REQUESTS_WAITING.encode()
_RUNNING = contract.VLLM_NUM_REQUESTS_RUNNING.encode()
_KV = contract.VLLM_KV_CACHE_USAGE_PERC.encode()


@dataclasses.dataclass(frozen=True, slots=True)
class Reported:
    waiting: float
    running: float
    kv_usage: float | None


def _sample_value(line: bytes, name: bytes) -> float | None:
    """The value of `name{...} value` or `name value`; None when the line is another family or odd."""
    rest = line[len(name) :]
    if rest.startswith(b"{"):
        end = rest.rfind(b"}")
        if end < 0:
            return None
        rest = rest[end + 1 :]
    elif not rest.startswith((b" ", b"\t")):
        return None  # a longer name with this one as its prefix
    fields = rest.split()
    if not fields:
        return None
    try:
        value = float(fields[0])
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_load(text: bytes) -> Reported | None:
    """Queued and running requests (summed over series) and KV usage (the highest series), from a
    Prometheus text exposition; None when it carries neither request count."""
    waiting = running = 0.0
    kv: float | None = None
    found = False
    for line in text.splitlines():
        if not line.startswith(b"vllm:"):
            continue
        if line.startswith(_WAITING) and (v := _sample_value(line, _WAITING)) is not None:
            waiting += v
            found = True
        elif line.startswith(_RUNNING) and (v := _sample_value(line, _RUNNING)) is not None:
            running += v
            found = True
        elif line.startswith(_KV) and (v := _sample_value(line, _KV)) is not None:
            kv = v if kv is None else max(kv, v)
    return Reported(max(0.0, waiting), max(0.0, running), kv) if found else None


class LoadScraper:
    """Keeps `scraped[name]` (a `picker.Scraped`) fresh for every ready replica."""

    def __init__(
        self,
        endpoints: endpoints_mod.EndpointSet,
        session: Callable[[], aiohttp.ClientSession | None],
        own_in_flight: Mapping[str, int],
        own_started: Mapping[str, int],
        *,
        interval_s: float,
        timeout_s: float,
        on_result: Callable[[str, Reported | None], None] = lambda _name, _reported: None,
    ) -> None:
        self.scraped: dict[str, picker.Scraped] = {}
        self._endpoints = endpoints
        self._session = session
        self._own = own_in_flight
        self._started = own_started
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._on_result = on_result
        self._busy: dict[str, asyncio.Task[Reported | None]] = {}

    async def scrape_one(self, name: str, url: str) -> Reported | None:
        session = self._session()
        if session is None:
            return None
        # This router's part of what the replica will report: its requests open there now plus any it
        # sends during the scrape. Requests that end meanwhile still count, so the others' share is never
        # overestimated (no phantom load from our own churn), at worst under by our churn in the window.
        own_before, started_before = self._own.get(name, 0), self._started.get(name, 0)
        try:
            timeout = aiohttp.ClientTimeout(total=self._timeout_s)
            async with session.get(url + contract.PATH_METRICS, timeout=timeout) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_SCRAPE_BYTES:
                        raise ValueError(f"over {MAX_SCRAPE_BYTES} bytes")
            reported = parse_load(bytes(body))
            if reported is None:
                raise ValueError(f"no {contract.VLLM_NUM_REQUESTS_WAITING} in its /metrics")
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            log.debug("scrape of %s failed: %s", name, error)
            self._on_result(name, None)
            return None
        if name in self._endpoints.replicas:
            ours = own_before + self._started.get(name, 0) - started_before
            self.scraped[name] = picker.Scraped(
                reported.waiting, reported.running, reported.kv_usage, time.monotonic(), ours
            )
        self._on_result(name, reported)
        return reported

    def _start(self, name: str, url: str) -> None:
        task = asyncio.ensure_future(self.scrape_one(name, url))
        self._busy[name] = task
        task.add_done_callback(lambda _t: self._busy.pop(name, None))

    async def run(self) -> None:
        try:
            while True:
                replicas = dict(self._endpoints.replicas)
                for gone in set(self.scraped) - set(replicas):
                    del self.scraped[gone]
                for name, url in replicas.items():
                    if name not in self._busy:  # a slow replica has at most one scrape open
                        self._start(name, url)
                await asyncio.sleep(self._interval_s)
        finally:
            for task in list(self._busy.values()):
                task.cancel()
