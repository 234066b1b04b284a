"""The aiohttp application: `create_app(config, engine_factory)` wires state, routes, metrics and the engine.

Everything the handlers share sits under typed `web.AppKey`s (no globals), and the engine's life is one
`cleanup_ctx`: a startup task builds it (weights load in a thread, so /health answers and requests get
503 meanwhile), and after `yield` the engine is shut down, aborting whatever is left. The engine reaches
the metrics only through the stats callback given here; it never imports the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from fleetlm_runtime import config as config_mod
from fleetlm_runtime import contract
from fleetlm_runtime import metrics as metrics_mod
from fleetlm_runtime.engine import async_engine
from fleetlm_runtime.engine import config as engine_config
from fleetlm_runtime.engine import request as request_mod
from fleetlm_runtime.server import api_keys as api_keys_mod
from fleetlm_runtime.server import routes
from fleetlm_runtime.server import state as state_mod

log = logging.getLogger(__name__)

engine_task_key = web.AppKey("engine_task", asyncio.Task[None])
# Ends (with the error) if the engine's worker dies after it came up: the server must then exit.
engine_death_key = web.AppKey("engine_death", asyncio.Task[BaseException])


def engine_config_from(cfg: config_mod.RuntimeConfig, *, device: str = "cpu") -> engine_config.EngineConfig:
    """The engine's own settings from the runtime config (the engine knows nothing of pydantic)."""
    return engine_config.EngineConfig(
        model=cfg.model.source,
        dtype=cfg.model.dtype,
        device=device,
        max_model_len=cfg.model.max_model_len,
        max_batch_size=cfg.batching.max_batch_size,
        max_batch_tokens=cfg.batching.max_batch_tokens,
        max_kv_tokens=cfg.batching.max_kv_tokens,
        kv_cache_memory=cfg.kv_cache.memory_bytes,
        gpu_memory_utilization=cfg.kv_cache.gpu_memory_utilization,
        kv_block_size=cfg.kv_cache.block_size,
        # The FIFO policy is the plain batcher kept as a baseline: arrival order whatever the class.
        scheduling_policy="fcfs" if cfg.qos.policy == contract.QOS_POLICY_FIFO else "priority",
        priority_aging_s=cfg.qos.priority_aging_s,
        # None: the cache is bounded by the KV pool alone.
        prefix_cache_max_tokens=cfg.caching.prefix_cache.max_tokens if cfg.caching.prefix_cache.enabled else 0,
        # Where the engine has a process of its own (every deployment): its first schema must not stall streams.
        prepare_grammars=cfg.server.engine_process,
    )


def default_engine_factory(cfg: config_mod.RuntimeConfig, *, device: str = "cpu") -> state_mod.EngineFactory:
    async def build(on_stats: state_mod.StatsCallback) -> async_engine.AsyncEngine:
        return await async_engine.AsyncEngine.create(
            engine_config_from(cfg, device=device),
            stats_callback=on_stats,
            executor_kind="process" if cfg.server.engine_process else "thread",
        )

    return build


def create_app(
    config: config_mod.RuntimeConfig,
    engine_factory: state_mod.EngineFactory | None = None,
    *,
    metrics: metrics_mod.RuntimeMetrics | None = None,
    admin_token: str | None = None,
    api_keys: dict[str, str] | None = None,
    api_keys_reload_s: float = api_keys_mod.DEFAULT_INTERVAL_S,
) -> web.Application:
    """The app serving `config`. The engine comes from `engine_factory` (default: built from the config
    on CPU), started when the app starts; until it is up, /ready and the API answer 503. With
    `qos.apiKeysFile`, the file is re-read every `api_keys_reload_s` seconds (a rotated Secret applies live)."""
    if metrics is None:
        metrics = metrics_mod.RuntimeMetrics(
            model_name=config.served_model_name,
            max_model_len=config.model.max_model_len or 2048,
            qos_classes=[c.name for c in config.qos.classes],
        )
    state = state_mod.ServerState(
        config=config, metrics=metrics, admin_token=admin_token, api_keys=dict(api_keys or {})
    )
    metrics.set_config(config, max_kv_tokens=config.batching.max_kv_tokens)
    factory = engine_factory or default_engine_factory(config)
    # The body limit is enforced by aiohttp while reading (413), before anything is parsed.
    app = web.Application(client_max_size=config.server.max_request_body_bytes, middlewares=[routes.error_middleware])
    app[state_mod.state_key] = state
    routes.setup_routes(app)

    async def engine_ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(_bring_up(state, factory), name="fleetlm-engine-startup")
        app[engine_task_key] = task
        death = asyncio.create_task(_watch_engine(state, task), name="fleetlm-engine-watch")
        app[engine_death_key] = death
        yield
        state.start_draining()
        for pending in (task, death):
            if not pending.done():
                pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pending
        if state.engine is not None:
            await state.engine.shutdown()

    app.cleanup_ctx.append(engine_ctx)
    if config.qos.api_keys_file:
        app.cleanup_ctx.append(api_keys_mod.watch_ctx(state, config.qos.api_keys_file, interval_s=api_keys_reload_s))
    return app


async def _bring_up(state: state_mod.ServerState, factory: state_mod.EngineFactory) -> None:
    """Load, then run one warm-up step, then turn ready: the first real request must not pay for lazy
    initialisation (allocator, kernels, the engine's worker), and /ready must mean "can serve now"."""
    try:
        engine = await factory(state.on_engine_stats)
        state.set_loaded(engine)
        await _warm_up(engine, qos_class=state.config.qos.default_class)
    except Exception as error:
        state.set_failed(error)
        log.exception("the engine failed to start")
        raise
    # What is loaded by now (modules, tokenizer, config) lives as long as the process. A full collection
    # walking it took up to a second under load (measured in this process at 32 streams), stalling every
    # stream and /metrics scrape at once; frozen objects are never walked again.
    gc.collect()
    gc.freeze()
    state.set_ready(engine)


async def _warm_up(engine: async_engine.AsyncEngine, *, qos_class: str) -> None:
    """One greedy 1-token generation through the engine, end to end; raises if it does not finish normally."""
    params = request_mod.SamplingParams(max_tokens=1, temperature=0.0)
    last = None
    async for out in engine.generate("warm up", params, req_id=state_mod.WARMUP_REQUEST_ID, qos_class=qos_class):
        last = out
    if last is None or not last.finished or str(last.finish_reason) not in ("length", "stop"):
        reason = None if last is None else last.finish_reason
        raise RuntimeError(f"the warm-up generation did not finish normally (finish reason {reason})")


async def _watch_engine(state: state_mod.ServerState, bring_up: asyncio.Task[None]) -> BaseException:
    """Wait for the engine to come up, then for it to die. A dead engine never serves again: /ready and
    /health turn false at once (phase failed, with the cause), and the caller exits the process."""
    await bring_up
    assert state.engine is not None
    error = await state.engine.wait_dead()
    if state.phase is not state_mod.Phase.DRAINING:  # dying while draining: the drain ends it anyway
        state.set_failed(error)
    log.error("the engine died: %s", error)
    return error
