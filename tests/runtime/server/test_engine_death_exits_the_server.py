"""The engine process killed under a serving `fleetlm-runtime`: in-flight streams end at once with an
error event, /ready and /health say "failed" (never "ready"), and the server exits 3 promptly with its
dead child reaped, so that the kubelet or any plain supervisor starts a fresh one."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from fleetlm_dev import testing
from fleetlm_runtime.server import app as app_mod
from fleetlm_runtime.server import state as state_mod

STREAM = {"model": "tiny", "prompt": "go on", "max_tokens": 400, "ignore_eos": True, "stream": True}


async def _events(resp: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    events = []
    async for raw in resp.content:
        line = raw.strip()
        if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
            events.append(json.loads(line[5:]))
    return events


def _engine_child(pid: int) -> int:
    """The engine core among the server's children (multiprocessing may add its resource tracker)."""
    for child in testing.children_of(pid):
        cmdline = pathlib.Path(f"/proc/{child}/cmdline").read_bytes()
        if b"resource_tracker" not in cmdline:
            return child
    raise AssertionError(f"no engine process under {pid}")


async def test_in_flight_streams_fail_and_the_server_exits_3(
    start_runtime: Callable[..., Any], process_config: Callable[..., dict[str, Any]]
) -> None:
    proc = start_runtime(process_config(model={"maxModelLen": 1024}))
    await asyncio.to_thread(proc.wait_ready)
    engine_pid = _engine_child(proc.proc.pid)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        responses = [await session.post(proc.url + "/v1/completions", json=STREAM) for _ in range(3)]
        for resp in responses:
            assert resp.status == 200
            assert (await resp.content.readline()).startswith(b"data:")  # streaming has begun
        killed = time.monotonic()
        os.kill(engine_pid, signal.SIGKILL)
        for resp in responses:
            events = await asyncio.wait_for(_events(resp), timeout=5)
            assert "error" in events[-1] and "engine" in events[-1]["error"]["message"], events[-1]
        streams_ended_s = time.monotonic() - killed
    code = await asyncio.to_thread(proc.proc.wait, 10)
    exited_s = time.monotonic() - killed
    assert code == 3, proc.log()
    assert not testing.is_running(engine_pid)
    assert "the engine died" in proc.log()
    print(f"engine killed: streams ended after {streams_ended_s:.2f}s, server exited 3 after {exited_s:.2f}s")
    assert exited_s < 5.0


async def test_ready_and_health_say_failed_once_the_engine_is_dead(
    make_server: Callable[..., Any], small_config: Callable[..., Any]
) -> None:
    server = await make_server(small_config(server={"engineProcess": True}))
    state = server.app[state_mod.state_key]
    engine_pid = state.engine._executor.pid
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{server.port}/ready") as r:
            assert r.status == 200
        os.kill(engine_pid, signal.SIGKILL)
        await asyncio.wait_for(server.app[app_mod.engine_death_key], timeout=5)
        assert state.phase is state_mod.Phase.FAILED
        async with session.get(f"http://127.0.0.1:{server.port}/ready") as r:
            assert r.status == 503 and (await r.json())["status"] == "failed"
        async with session.get(f"http://127.0.0.1:{server.port}/health") as r:
            body = await r.json()
            assert r.status == 503 and body["status"] == "failed" and "engine process exited" in body["error"]
        async with session.post(
            f"http://127.0.0.1:{server.port}/v1/completions", json={**STREAM, "stream": False}
        ) as r:
            assert r.status == 503
