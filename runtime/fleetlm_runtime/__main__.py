"""`fleetlm-runtime`: load the config, start the HTTP server, load the model behind it, drain on SIGTERM.

The port opens before the model loads, so /health answers at once and /ready turns true when the engine
is up (Kubernetes' startup and readiness probes read exactly that). On SIGTERM (or SIGINT) readiness
turns false immediately, new requests get 503, in-flight streams get up to the drain grace period to
finish, and the process exits 0. If the engine dies while serving (its process killed, a crash in native
code), in-flight streams end with an error event, /ready and /health answer 503 with the cause, and the
process exits 3 at once, so that the kubelet (or any supervisor) starts a fresh one. Exit codes: 0 after a
drain, 1 if the model failed to load, 2 for a bad configuration, 3 if the engine died. This module is
wiring only; it must never hold serving logic.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from fleetlm_runtime import config as config_mod
from fleetlm_runtime import gpu
from fleetlm_runtime import metrics as metrics_mod
from fleetlm_runtime.server import app as app_mod
from fleetlm_runtime.server import auth
from fleetlm_runtime.server import state as state_mod

log = logging.getLogger("fleetlm_runtime")

EXIT_ENGINE_DIED = 3
_ABORT_WAIT_S = 2.0  # after the grace period: time for aborted streams to send their last chunk


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fleetlm-runtime", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory, or builtin:tiny / builtin:small")
    p.add_argument("--config", default=None, help="runtime config YAML (schemaVersion v1)")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port to bind (default 8000; 0 picks one)")
    p.add_argument("--admin-token-file", default=None, help="file holding the admin bearer token")
    p.add_argument("--dtype", default=None, choices=("auto", "float32", "float16", "bfloat16"))
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--max-batch-tokens", type=int, default=None)
    p.add_argument("--max-kv-tokens", type=int, default=None, help="KV pool size in tokens (batching.maxKvTokens)")
    p.add_argument(
        "--kv-cache-memory",
        default=None,
        help="KV pool size in bytes or a quantity such as 512Mi or 4Gi (kvCache.memory); allocated once at start",
    )
    p.add_argument("--max-queue-len", type=int, default=None)
    p.add_argument("--drain-grace-period", type=float, default=None, help="seconds in-flight requests get")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--stream-interval", type=int, default=None, help="tokens per stream chunk (default 1)")
    p.add_argument("--api-keys-file", default=None, help="YAML map API key -> QoS class (qos.apiKeysFile)")
    p.add_argument(
        "--require-api-key",
        action="store_true",
        default=None,
        help="refuse (401) requests without a key from the api keys file (qos.requireApiKey)",
    )
    p.add_argument(
        "--qos-policy",
        choices=("priority", "fifo"),
        default=None,
        help="priority (default): classes, queue limits, shedding; fifo: the plain batcher, a baseline",
    )
    p.add_argument(
        "--no-response-cache",
        action="store_true",
        default=None,
        help="compute every request (caching.responseCache.enabled: false)",
    )
    p.add_argument(
        "--no-prefix-cache",
        action="store_true",
        default=None,
        help="prefill every prompt in full (caching.prefixCache.enabled: false)",
    )
    p.add_argument("--log-format", choices=("text", "json"), default=None)
    p.add_argument("--log-level", default="INFO")
    # "auto" is resolved where the model loads, so the server process itself never has to import torch.
    p.add_argument("--device", default=None, help="torch device (default auto: cuda when available, else cpu)")
    return p


def config_from_args(args: argparse.Namespace) -> config_mod.RuntimeConfig:
    """The file (or defaults) with command-line overrides, validated as a whole."""
    base = config_mod.load_config(args.config) if args.config else config_mod.RuntimeConfig()
    data: dict[str, Any] = config_mod.dump_config(base)
    overrides = {
        ("model", "source"): args.model,
        ("model", "dtype"): args.dtype,
        ("model", "servedModelName"): args.served_model_name,
        ("server", "host"): args.host,
        ("server", "port"): args.port,
        ("server", "adminTokenFile"): args.admin_token_file,
        ("server", "logFormat"): args.log_format,
        ("server", "drainGracePeriodS"): args.drain_grace_period,
        ("server", "streamIntervalTokens"): args.stream_interval,
        ("batching", "maxBatchSize"): args.max_batch_size,
        ("batching", "maxBatchTokens"): args.max_batch_tokens,
        ("batching", "maxKvTokens"): args.max_kv_tokens,
        ("batching", "maxQueueLen"): args.max_queue_len,
        ("qos", "apiKeysFile"): args.api_keys_file,
        ("qos", "requireApiKey"): args.require_api_key,
        ("qos", "policy"): args.qos_policy,
    }
    if args.kv_cache_memory is not None:
        memory = args.kv_cache_memory
        data.setdefault("kvCache", {})["memory"] = int(memory) if memory.isdigit() else memory
    for (section, key), value in overrides.items():
        if value is not None:
            data[section][key] = value
    if args.no_response_cache:
        data["caching"]["responseCache"]["enabled"] = False
    if args.no_prefix_cache:
        data["caching"]["prefixCache"]["enabled"] = False
    return config_mod.parse_config(data)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


async def serve(
    cfg: config_mod.RuntimeConfig,
    *,
    admin_token: str | None,
    api_keys: dict[str, str],
    device: str,
) -> int:
    sampler = gpu.open_nvml()
    metrics = metrics_mod.RuntimeMetrics(
        model_name=cfg.served_model_name,
        max_model_len=cfg.model.max_model_len or 2048,
        qos_classes=[c.name for c in cfg.qos.classes],
        gpu_sampler=sampler,
    )
    app = app_mod.create_app(
        cfg,
        app_mod.default_engine_factory(cfg, device=device),
        metrics=metrics,
        admin_token=admin_token,
        api_keys=api_keys,
    )
    state = app[state_mod.state_key]
    # handler_cancellation: a client that hangs up cancels its handler, which aborts its engine request
    # even while it is still queued (no write would notice the disconnect before the first token).
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, cfg.server.host, cfg.server.port, reuse_address=True)
    try:
        await site.start()
    except OSError as error:
        log.error("cannot listen on %s:%d: %s", cfg.server.host, cfg.server.port, error)
        await runner.cleanup()
        return 1
    log.info("listening on http://%s:%d (model %s loading)", cfg.server.host, cfg.server.port, cfg.model.source)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    engine_task = app[app_mod.engine_task_key]
    death = app[app_mod.engine_death_key]
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, engine_task}, return_when=asyncio.FIRST_COMPLETED)
    if engine_task.done() and not stop.is_set() and engine_task.exception() is not None:
        waiter.cancel()
        log.error("exiting: the engine failed to start (%s)", state.load_error)
        await runner.cleanup()
        return 1
    if not stop.is_set():
        await asyncio.wait({waiter, death}, return_when=asyncio.FIRST_COMPLETED)
    if death.done() and not death.cancelled() and death.exception() is None and not stop.is_set():
        waiter.cancel()
        # The streams already got their error event; give them a moment to be written, then go.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.idle.wait(), timeout=_ABORT_WAIT_S)
        log.error("exiting: the engine died (%s)", state.load_error)
        await runner.cleanup()
        if sampler is not None:
            sampler.close()
        return EXIT_ENGINE_DIED

    state.start_draining()
    grace = cfg.server.drain_grace_period_s
    try:
        await asyncio.wait_for(state.idle.wait(), timeout=grace)
        log.info("drained: no requests in flight")
    except TimeoutError:
        log.warning("drain grace period (%.1fs) over, %d requests in flight; aborting them", grace, state.num_inflight)
        state.abort_inflight()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.idle.wait(), timeout=_ABORT_WAIT_S)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    await runner.cleanup()
    if sampler is not None:
        sampler.close()
    log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        setup_logging(cfg.server.log_format, args.log_level)
        admin_token = auth.read_token_file(cfg.server.admin_token_file) if cfg.server.admin_token_file else None
        api_keys = (
            config_mod.load_api_keys(cfg.qos.api_keys_file, classes={c.name for c in cfg.qos.classes})
            if cfg.qos.api_keys_file
            else {}
        )
    except config_mod.ConfigError as error:
        print(f"fleetlm-runtime: configuration error: {error}", file=sys.stderr)
        return 2
    if admin_token is None:
        log.info("no admin token file: the admin API is disabled")
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(serve(cfg, admin_token=admin_token, api_keys=api_keys, device=args.device or "auto"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
