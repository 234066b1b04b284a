"""Start-up the scaler understands: /ready turns true only after the model loaded and one warm-up step ran;
until then /v1/models answers 503 with Retry-After like the other API routes, a malformed body still gets
its 400, and /metrics carries the process start, model-loaded and ready timestamps (the last two absent,
never 0, until they happen). The warm-up request is not traffic: no counter or histogram sees it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import test_utils
from prometheus_client import parser

from fleetlm_runtime import contract
from fleetlm_runtime.engine import async_engine, outputs
from fleetlm_runtime.server import app as app_mod
from fleetlm_runtime.server import state as state_mod

MakeServer = Callable[..., Awaitable[test_utils.TestServer]]


async def _get(server: test_utils.TestServer, path: str) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{server.port}{path}") as resp:
        return resp.status, dict(resp.headers), await resp.text()


async def _post(server: test_utils.TestServer, path: str, data: bytes) -> tuple[int, dict[str, str], Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{server.port}{path}", data=data, headers={"Content-Type": "application/json"}
        ) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.json(content_type=None)


def _samples(text: str, family: str) -> list[float]:
    return [s.value for f in parser.text_string_to_metric_families(text) if f.name == family for s in f.samples]


def _gated_factory(
    cfg: Any, release: asyncio.Event, seen: list[tuple[outputs.EngineStats, str]], state: list[state_mod.ServerState]
) -> state_mod.EngineFactory:
    """The real engine, built once `release` is set; every step it reports is recorded with the phase the
    server was in when the step's stats arrived."""
    build = app_mod.default_engine_factory(cfg)

    async def factory(on_stats: state_mod.StatsCallback) -> async_engine.AsyncEngine:
        def spy(stats: outputs.EngineStats) -> None:
            seen.append((stats, str(state[0].phase)))
            on_stats(stats)

        await release.wait()
        return await build(spy)

    return factory


async def test_loading_answers_503_on_models_400_on_bad_bodies_and_ready_after_warmup(
    make_server: MakeServer, small_config: Any
) -> None:
    cfg = small_config()
    release = asyncio.Event()
    seen: list[tuple[outputs.EngineStats, str]] = []
    holder: list[state_mod.ServerState] = []
    before_s = time.time()
    server = await make_server(cfg, engine_factory=_gated_factory(cfg, release, seen, holder), wait_ready=False)
    holder.append(server.app[state_mod.state_key])

    # Loading: /v1/models is a 503 in OpenAI's shape, with Retry-After, like the completions.
    status, headers, text = await _get(server, contract.PATH_MODELS)
    assert status == 503 and "Retry-After" in headers
    error = json.loads(text)["error"]
    assert error["code"] == "loading" and error["type"] == "service_unavailable"
    # A malformed body is still the client's 400, on both POST routes; a valid one is told to come back.
    status, headers, reply = await _post(server, contract.PATH_COMPLETIONS, b"{not json")
    assert status == 400 and "Retry-After" not in headers and reply["error"]["type"] == "invalid_request_error"
    bad_field = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1})
    status, _, reply = await _post(server, contract.PATH_CHAT_COMPLETIONS, bad_field.encode())
    assert status == 400 and reply["error"]["param"] == "max_tokens"
    status, headers, reply = await _post(server, contract.PATH_COMPLETIONS, b'{"model": "tiny", "prompt": "x"}')
    assert status == 503 and "Retry-After" in headers and reply["error"]["code"] == "loading"
    # The process start is known from the first scrape; the model-loaded and ready moments are not yet.
    _, _, metrics_text = await _get(server, contract.PATH_METRICS)
    (process_start,) = _samples(metrics_text, contract.PROCESS_START_TIME_SECONDS)
    assert 0 < process_start <= before_s
    assert _samples(metrics_text, contract.MODEL_LOADED_TIME_SECONDS) == []
    assert _samples(metrics_text, contract.READY_TIME_SECONDS) == []

    release.set()
    await asyncio.wait_for(server.app[app_mod.engine_task_key], 60)
    status, _, text = await _get(server, contract.PATH_MODELS)
    assert status == 200 and json.loads(text)["data"][0]["id"] == "tiny"

    # The warm-up went through the engine, first token and all, before the server turned ready.
    warmup = [(event.kind, phase) for stats, phase in seen for event in stats.events
              if event.req_id == state_mod.WARMUP_REQUEST_ID]  # fmt: skip
    assert (outputs.EventKind.FIRST_TOKEN, "loading") in warmup
    assert (outputs.EventKind.FINISHED, "loading") in warmup
    assert all(phase == "loading" for _, phase in warmup)

    _, _, metrics_text = await _get(server, contract.PATH_METRICS)
    (loaded,) = _samples(metrics_text, contract.MODEL_LOADED_TIME_SECONDS)
    (ready,) = _samples(metrics_text, contract.READY_TIME_SECONDS)
    assert process_start <= before_s <= loaded <= ready <= time.time()
    assert _samples(metrics_text, contract.SERVER_READY) == [1.0]
    # Nobody sent a request yet: the warm-up is in no counter or histogram.
    assert sum(_samples(metrics_text, contract.REQUEST_SUCCESS)) == 0
    ttft_counts = [
        s.value
        for f in parser.text_string_to_metric_families(metrics_text)
        if f.name == contract.TIME_TO_FIRST_TOKEN_SECONDS
        for s in f.samples
        if s.name.endswith("_count")
    ]
    assert sum(ttft_counts) == 0
    assert sum(_samples(metrics_text, contract.PROMPT_TOKENS)) == 0


async def test_the_timestamps_keep_the_first_ready_through_draining(server: test_utils.TestServer) -> None:
    _, _, before = await _get(server, contract.PATH_METRICS)
    (ready,) = _samples(before, contract.READY_TIME_SECONDS)
    server.app[state_mod.state_key].start_draining()
    status, headers, text = await _get(server, contract.PATH_MODELS)
    assert status == 503 and "Retry-After" in headers and json.loads(text)["error"]["code"] == "draining"
    _, _, after = await _get(server, contract.PATH_METRICS)
    assert _samples(after, contract.READY_TIME_SECONDS) == [ready]
    assert _samples(after, contract.SERVER_READY) == [0.0]


async def test_a_failed_warm_up_fails_the_start(make_server: MakeServer, small_config: Any) -> None:
    cfg = small_config()
    build = app_mod.default_engine_factory(cfg)

    async def broken(on_stats: state_mod.StatsCallback) -> async_engine.AsyncEngine:
        engine = await build(on_stats)

        def crash() -> Any:
            raise RuntimeError("simulated kernel failure on the first step")

        engine.core.step = crash  # type: ignore[method-assign]
        return engine

    server = await make_server(cfg, engine_factory=broken, wait_ready=False)
    task = server.app[app_mod.engine_task_key]
    await asyncio.wait([task], timeout=60)
    assert task.done()
    status, _, _ = await _get(server, contract.PATH_READY)
    assert status == 503
    status, _, text = await _get(server, contract.PATH_HEALTH)
    assert status == 503 and json.loads(text)["status"] == "failed"
    _, _, metrics_text = await _get(server, contract.PATH_METRICS)
    assert len(_samples(metrics_text, contract.MODEL_LOADED_TIME_SECONDS)) == 1
    assert _samples(metrics_text, contract.READY_TIME_SECONDS) == []
