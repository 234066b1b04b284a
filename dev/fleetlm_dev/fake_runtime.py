"""A stand-in runtime pod whose load the test sets: real /metrics, a real admin endpoint, no model.

It exports the runtime's own metrics module (`fleetlm_runtime.metrics.RuntimeMetrics`, so names,
labels and buckets are the contract's), fed with synthetic engine steps at a set request rate, TTFT,
TPOT and queue depth; and it records every tuning push the operator makes to PUT /admin/config.
Tests use it where the operator's decisions, not the model, are under test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import threading
import time
from typing import Any

from aiohttp import web

from fleetlm_runtime import contract
from fleetlm_runtime import metrics as runtime_metrics
from fleetlm_runtime.engine import outputs
from fleetlm_runtime.engine import request as request_mod


@dataclasses.dataclass(slots=True)
class Load:
    requests_per_s: float = 2.0
    ttft_s: float = 0.2
    tpot_s: float = 0.02
    output_tokens: int = 32
    waiting: int = 0
    running: int = 1
    kv_usage: float = 0.3
    qos_class: str = "default"


class FakeRuntime:
    """Serve on `host:port` from a background thread until `stop()`; change `load` at any time."""

    def __init__(self, *, host: str, port: int, admin_token: str | None = None, model: str = "builtin:tiny") -> None:
        self.host, self.port = host, port
        self.admin_token = admin_token
        self.load = Load()
        self.pushes: list[dict[str, Any]] = []
        self.limits = {"maxBatchSize": 8, "maxBatchTokens": 512}
        self.metrics = runtime_metrics.RuntimeMetrics(model_name=model, max_model_len=2048)
        self._loop: asyncio.AbstractEventLoop | None = None  # the thread's own, closed when it ends
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name=f"fake-runtime-{host}", daemon=True)
        self._request = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeRuntime:
        self._thread.start()
        if not self._ready.wait(timeout=10):
            raise RuntimeError(f"fake runtime on {self.url} did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        # Made and closed here: a loop left to the garbage collector (with its self-pipe sockets) surfaces as
        # an unraisable ResourceWarning in whichever test happens to run next.
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        finally:
            asyncio.set_event_loop(None)
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_get(contract.PATH_METRICS, self._metrics)
        app.router.add_get(contract.PATH_HEALTH, self._ok)
        app.router.add_get(contract.PATH_READY, self._ok)
        app.router.add_put(contract.PATH_ADMIN_CONFIG, self._admin_put)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, self.host, self.port).start()
        # Like the runtime: loaded, then ready (no model to load or warm up here), with the timestamps.
        self.metrics.mark_model_loaded(time.time())
        self.metrics.set_ready(True)
        self.metrics.mark_ready(time.time())
        ticker = asyncio.create_task(self._tick())
        self._ready.set()
        await self._stop.wait()
        ticker.cancel()
        await runner.cleanup()

    async def _tick(self) -> None:
        """Every 100 ms, one synthetic engine step carrying the requests that finished in it."""
        carry = 0.0
        while True:
            await asyncio.sleep(0.1)
            load = self.load
            carry += load.requests_per_s * 0.1
            events = []
            now = time.monotonic()
            while carry >= 1.0:
                carry -= 1.0
                self._request += 1
                ttft = load.ttft_s * random.uniform(0.9, 1.1)
                decode = load.tpot_s * (load.output_tokens - 1)
                arrival = now - ttft - decode
                events.append(
                    outputs.RequestEvent(
                        kind=outputs.EventKind.FIRST_TOKEN,
                        req_id=str(self._request),
                        qos_class=load.qos_class,
                        time_s=arrival + ttft,
                        arrival_time_s=arrival,
                    )
                )
                events.append(
                    outputs.RequestEvent(
                        kind=outputs.EventKind.FINISHED,
                        req_id=str(self._request),
                        qos_class=load.qos_class,
                        time_s=now,
                        arrival_time_s=arrival,
                        finish_reason=request_mod.FinishReason.LENGTH,
                        num_prompt_tokens=64,
                        num_output_tokens=load.output_tokens,
                        scheduled_time_s=arrival + ttft * 0.5,
                        first_token_time_s=arrival + ttft,
                    )
                )
            self.metrics.record(
                outputs.EngineStats(
                    now_s=now,
                    step_duration_s=0.1,
                    model_duration_s=0.09,
                    batch_size=load.running,
                    num_tokens=load.running,
                    num_prefill_tokens=0,
                    num_decode_tokens=load.running,
                    num_running=load.running,
                    num_waiting=load.waiting,
                    running_by_class={load.qos_class: load.running},
                    waiting_by_class={load.qos_class: load.waiting},
                    kv_usage=load.kv_usage,
                    num_kv_tokens_reserved=0,
                    kv_capacity_tokens=4096,
                    max_batch_size=self.limits["maxBatchSize"],
                    max_batch_tokens=self.limits["maxBatchTokens"],
                    events=tuple(events),
                )
            )

    async def _ok(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain")

    async def _admin_put(self, request: web.Request) -> web.Response:
        if self.admin_token is not None and request.headers.get("Authorization") != f"Bearer {self.admin_token}":
            return web.json_response(
                {"error": {"message": "bad token", "type": "unauthorized", "code": 401}}, status=401
            )
        body = json.loads(await request.text())
        self.pushes.append(body)
        self.limits.update(body.get("batching", {}))
        return web.json_response({"config": body})
