"""State the handlers share: the lifecycle phase, the applied config, queue accounting, the engine.

`ServerState` lives under `state_key` on the app (no globals). It carries the lifecycle that /ready,
the 503 answers and the SIGTERM drain read (loading -> ready -> draining, or failed), the config in force
(replaced whole by PUT /admin/config), the per-class requests not yet scheduled (with their arrival
times) and the recent TTFTs that admission reads, and the response cache. No aiohttp handlers here, and
no model work.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from fleetlm_runtime import config as config_mod
from fleetlm_runtime import contract
from fleetlm_runtime import metrics as metrics_mod
from fleetlm_runtime import qos as qos_mod
from fleetlm_runtime.caches import response_store
from fleetlm_runtime.engine import async_engine, outputs
from fleetlm_runtime.server import schemas

log = logging.getLogger(__name__)

StatsCallback = Callable[[outputs.EngineStats], None]
# Builds and starts the engine (loading weights takes a while; the factory must not block the loop).
EngineFactory = Callable[[StatsCallback], Awaitable[async_engine.AsyncEngine]]


# The request the server runs through the engine before it turns ready; never counted in the metrics.
WARMUP_REQUEST_ID = "fleetlm-warmup"


class Phase(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


def max_model_len(engine: async_engine.AsyncEngine) -> int:
    return engine.max_model_len


def kv_capacity_tokens(engine: async_engine.AsyncEngine) -> int:
    return engine.kv_capacity_tokens


@dataclass(eq=False)
class ServerState:
    config: config_mod.RuntimeConfig
    metrics: metrics_mod.RuntimeMetrics
    admin_token: str | None = None
    api_keys: dict[str, str] = field(default_factory=dict)
    phase: Phase = Phase.LOADING
    engine: async_engine.AsyncEngine | None = None
    load_error: str | None = None
    started_at: int = field(default_factory=lambda: int(time.time()))
    inflight: set[str] = field(default_factory=set)  # req_ids with a handler serving them
    # Requests admitted but not yet scheduled, per class, req_id -> arrival (time.monotonic(), the engine's
    # clock): what the queue limits count and how long the oldest has waited. Entries leave on the engine's
    # SCHEDULED/FINISHED events (or the request's end), so a burst between two engine steps is counted too,
    # which a gauge read from the last step would miss. Insertion order is arrival order.
    waiting: dict[str, dict[str, float]] = field(default_factory=dict)
    # The engine streams of the waiting requests (by req_id), so that an eviction can end them, and the
    # evictions their handlers have not answered yet (a 429 each).
    waiting_streams: dict[str, list[async_engine.RequestStream]] = field(default_factory=dict)
    evicted: dict[str, qos_mod.Eviction] = field(default_factory=dict)
    recent_ttft: qos_mod.RecentTTFT = field(default_factory=qos_mod.RecentTTFT)
    response_cache: response_store.ResponseCache | None = None  # None: switched off
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time  # the start-up timestamps are unix time, like Prometheus'

    def __post_init__(self) -> None:
        self.idle.set()
        self.response_cache = make_response_cache(self.config)

    @property
    def model_name(self) -> str:
        return self.config.served_model_name

    @property
    def engine_dead(self) -> bool:
        """The engine was up and its worker is gone (not during shutdown, when that is expected)."""
        return self.phase is Phase.READY and self.engine is not None and not self.engine.is_running

    def require_engine(self) -> async_engine.AsyncEngine:
        """The engine when requests are admitted; a 503 (loading, draining or failed) otherwise."""
        if self.phase is Phase.READY and self.engine is not None:
            return self.engine
        retry = {"Retry-After": str(self.config.server.retry_after_s)}
        if self.phase is Phase.DRAINING:
            raise schemas.APIError(
                503,
                "the server is shutting down; retry on another replica",
                type="service_unavailable",
                code="draining",
                reason=contract.REJECT_DRAINING,
                headers=retry,
            )
        if self.phase is Phase.FAILED:
            message = f"the engine is not available: {self.load_error}"
        else:
            message = "the model is loading; retry shortly"
        raise schemas.APIError(
            503, message, type="service_unavailable", code="loading", reason=contract.REJECT_LOADING, headers=retry
        )

    # ----------------------------------------------------------------------------------------------
    # In-flight and queue accounting

    @property
    def num_inflight(self) -> int:
        return len(self.inflight)

    def request_started(self, req_id: str) -> None:
        """A handler serves `req_id` (the drain waits for it), from the engine or from the cache."""
        self.inflight.add(req_id)
        self.idle.clear()

    def mark_waiting(self, req_id: str, qos_class: str, streams: list[async_engine.RequestStream]) -> None:
        """`req_id` is in the engine (as `streams`) and waits for a batch slot."""
        self.waiting.setdefault(qos_class, {})[req_id] = self.clock()
        self.waiting_streams[req_id] = streams

    def request_finished(self, req_id: str, qos_class: str) -> None:
        self.unmark_waiting(req_id, qos_class)
        self.evicted.pop(req_id, None)
        self.inflight.discard(req_id)
        if not self.inflight:
            self.idle.set()

    def abort_inflight(self) -> int:
        """End every request still being served (drain grace period over): each stream then closes
        properly, with finish_reason "abort" and [DONE], instead of being cut mid-chunk."""
        if self.engine is None:
            return 0
        for req_id in list(self.inflight):
            self.engine.abort(req_id)
        return len(self.inflight)

    def unmark_waiting(self, req_id: str, qos_class: str) -> None:
        ids = self.waiting.get(qos_class)
        if ids is not None:
            ids.pop(req_id, None)
        self.waiting_streams.pop(req_id, None)

    def evict(self, eviction: qos_mod.Eviction) -> int:
        """End the waiting requests `eviction` names (the newest first) in the engine, their KV freed before
        its next step; each handler then answers its client 429 (`take_eviction`). How many were evicted."""
        ids = list(self.waiting.get(eviction.qos_class, {}))
        chosen = ids if eviction.count is None else ids[len(ids) - eviction.count :]
        for req_id in chosen:
            streams = self.waiting_streams.get(req_id, [])
            self.unmark_waiting(req_id, eviction.qos_class)
            self.evicted[req_id] = eviction
            for stream in streams:
                stream.abort()
        if chosen:
            log.info("evicted %d waiting %s requests: %s", len(chosen), eviction.qos_class, eviction.message)
        return len(chosen)

    def take_eviction(self, req_id: str) -> qos_mod.Eviction | None:
        """The eviction of `req_id`, once: its handler answers 429 instead of the output."""
        return self.evicted.pop(req_id, None)

    def num_waiting(self, qos_class: str | None = None) -> int:
        if qos_class is not None:
            return len(self.waiting.get(qos_class, ()))
        return sum(len(ids) for ids in self.waiting.values())

    def class_load(self) -> dict[str, qos_mod.ClassLoad]:
        """What admission reads: per class, the requests waiting, the oldest one's wait, the recent TTFT."""
        now = self.clock()
        window_s = self.config.qos.shedding.window_s
        load = {}
        # Requests of a class removed live still wait in the engine: they count towards the queue bound.
        names = [cls.name for cls in self.config.qos.classes]
        names += [name for name, ids in self.waiting.items() if ids and name not in names]
        for name in names:
            ids = self.waiting.get(name)
            oldest = now - next(iter(ids.values())) if ids else 0.0
            load[name] = qos_mod.ClassLoad(
                num_waiting=len(ids) if ids else 0,
                oldest_wait_s=max(0.0, oldest),
                recent_ttft_s=self.recent_ttft.quantile(name, now_s=now, window_s=window_s),
            )
        return load

    def admit(self, qos_class: str) -> qos_mod.Verdict:
        return qos_mod.admit(
            qos_class, qos=self.config.qos, max_queue_len=self.config.batching.max_queue_len, load=self.class_load()
        )

    def on_engine_stats(self, stats: outputs.EngineStats) -> None:
        """The engine's per-step callback (on the loop thread): metrics, then the queue accounting.

        Steps before ready (the warm-up) are no traffic: counting them would show a request nobody sent
        and make a new pod's counters start above zero at its ready time."""
        if self.phase is not Phase.LOADING and not any(e.req_id == WARMUP_REQUEST_ID for e in stats.events):
            self.metrics.record(stats)
        for event in stats.events:
            if event.kind is outputs.EventKind.FIRST_TOKEN:
                ttft_s = event.time_s - event.arrival_time_s
                self.recent_ttft.observe(event.qos_class, now_s=event.time_s, ttft_s=ttft_s)
            else:
                self.unmark_waiting(event.req_id, event.qos_class)

    def refresh_idle_gauges(self) -> None:
        """The engine reports stats only for steps it runs; after the last request leaves by abort no step
        runs, so at scrape time an idle engine's gauges are set from its state (then truthfully zero)."""
        engine = self.engine
        if engine is not None and engine.num_unfinished == 0:
            self.metrics.set_idle(kv_usage=engine.kv_usage)

    # ----------------------------------------------------------------------------------------------
    # Lifecycle and live tuning

    def set_loaded(self, engine: async_engine.AsyncEngine) -> None:
        """The engine is built and the weights are in memory; still LOADING until the warm-up step ran."""
        self.metrics.mark_model_loaded(self.wall_clock())
        self.metrics.set_config(self.config, max_kv_tokens=kv_capacity_tokens(engine))

    def set_ready(self, engine: async_engine.AsyncEngine) -> None:
        self.engine = engine
        self.metrics.set_engine_info(engine.info)
        self.metrics.set_config(self.config, max_kv_tokens=kv_capacity_tokens(engine))
        if self.phase is Phase.LOADING:
            self.phase = Phase.READY
            self.metrics.set_ready(True)
            self.metrics.mark_ready(self.wall_clock())
            log.info("model %s ready (context %d tokens)", self.model_name, max_model_len(engine))

    def set_failed(self, error: BaseException) -> None:
        self.phase = Phase.FAILED
        self.load_error = f"{type(error).__name__}: {error}"
        self.metrics.set_ready(False)

    def start_draining(self) -> None:
        if self.phase is Phase.DRAINING:
            return
        log.info("draining: readiness is false, new requests get 503; %d in flight", self.num_inflight)
        self.phase = Phase.DRAINING
        self.metrics.set_ready(False)

    def apply_config(self, new_config: config_mod.RuntimeConfig) -> config_mod.RuntimeConfig:
        """Put a validated config in force live: batch limits reach the engine before its next step, the class
        table, shed classes and the other admission settings apply to the next request (admitted requests keep
        the priority and weight they were admitted with), and the response cache is
        emptied when anything that decides outputs changed (the model section, or the cache's own settings).
        Batch limits and shed classes change no output, so they keep the cache. Returns the config in force."""
        old = self.config
        if self.engine is not None and new_config.batching != old.batching:
            self.engine.update_limits(
                max_batch_size=new_config.batching.max_batch_size,
                max_batch_tokens=new_config.batching.max_batch_tokens,
            )
        self.config = new_config
        for name in set(new_config.qos.shed_classes) - set(old.qos.shed_classes):
            # Shed from now on: the ones still waiting are refused too (see qos.admit).
            self.evict(qos_mod.Eviction(name, None, contract.CODE_CLASS_SHED, qos_mod.shed_message(name)))
        if new_config.model != old.model or new_config.caching.response_cache != old.caching.response_cache:
            if self.response_cache is not None:
                self.response_cache.clear()
            self.response_cache = make_response_cache(new_config)
            log.info("response cache %s and emptied", "rebuilt" if self.response_cache else "switched off")
        kv = kv_capacity_tokens(self.engine) if self.engine is not None else new_config.batching.max_kv_tokens
        self.metrics.set_config(new_config, max_kv_tokens=kv)
        log.info(
            "config applied: max_batch_size=%d max_batch_tokens=%d classes=%s default=%s shed_classes=%s",
            new_config.batching.max_batch_size,
            new_config.batching.max_batch_tokens,
            ",".join(f"{c.name}(p{c.priority},w{c.weight:g})" for c in new_config.qos.classes),
            new_config.qos.default_class,
            ",".join(new_config.qos.shed_classes) or "-",
        )
        return new_config


def make_response_cache(cfg: config_mod.RuntimeConfig) -> response_store.ResponseCache | None:
    settings = cfg.caching.response_cache
    if not settings.enabled:
        return None
    return response_store.ResponseCache(
        max_entries=settings.max_entries, max_bytes=settings.max_bytes, ttl_s=settings.ttl_s
    )


state_key = web.AppKey("state", ServerState)
