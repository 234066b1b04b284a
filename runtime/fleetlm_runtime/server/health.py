"""Probes and metrics: /health (alive), /ready (loaded, warmed up, not draining), /metrics (Prometheus text).

Kubernetes reads these: liveness must stay cheap and true while the process can serve or drain, and
readiness must turn false the moment draining starts so the Service stops sending traffic. Nothing here
waits on the engine.
"""

from __future__ import annotations

from aiohttp import web

from fleetlm_runtime import metrics as metrics_mod
from fleetlm_runtime.server import state as state_mod


async def health(request: web.Request) -> web.Response:
    state = request.app[state_mod.state_key]
    if state.phase is state_mod.Phase.FAILED:
        return web.json_response({"status": "failed", "error": state.load_error}, status=503)
    if state.engine_dead:
        # The engine's worker died: nothing can be served again, so liveness fails and the pod restarts.
        return web.json_response({"status": "failed", "error": "the engine stopped"}, status=503)
    return web.json_response({"status": "ok", "phase": str(state.phase)})


async def ready(request: web.Request) -> web.Response:
    state = request.app[state_mod.state_key]
    ok = state.phase is state_mod.Phase.READY and not state.engine_dead
    return web.json_response({"status": str(state.phase), "model": state.model_name}, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[state_mod.state_key]
    state.refresh_idle_gauges()
    body = state.metrics.render()
    return web.Response(body=body, headers={"Content-Type": metrics_mod.CONTENT_TYPE})
