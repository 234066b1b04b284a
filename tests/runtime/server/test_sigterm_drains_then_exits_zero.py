"""SIGTERM on the real `fleetlm-runtime` process: readiness turns false at once, new requests get 503,
the in-flight stream runs to its end, and the process exits 0, its engine-core process with it. Past the
grace period, what is still running is aborted and the process still exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from typing import Any

import aiohttp

from fleetlm_dev import testing


async def _read_stream(resp: aiohttp.ClientResponse) -> tuple[int, str | None, bool]:
    tokens, reason, done = 0, None, False
    async for raw in resp.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif chunk.get("choices") and chunk["choices"][0]["finish_reason"]:
            reason = chunk["choices"][0]["finish_reason"]
    return tokens, reason, done


async def test_sigterm_finishes_in_flight_streams_and_exits_zero(
    start_runtime: Callable[..., Any], process_config: Callable[..., dict[str, Any]]
) -> None:
    proc = start_runtime(process_config(server={"drainGracePeriodS": 60}, model={"maxModelLen": 2048}))
    await asyncio.to_thread(proc.wait_ready)
    body = {
        "model": "tiny",
        "prompt": "a long answer please",
        "max_tokens": 1500,  # long enough to still be running while the checks below are made
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with aiohttp.ClientSession() as session:
        resp = await session.post(proc.url + "/v1/completions", json=body)
        assert resp.status == 200
        first = await resp.content.readline()
        assert first.startswith(b"data:")
        children = testing.children_of(proc.proc.pid)  # the engine core (and multiprocessing's resource tracker)
        assert children, "the engine core should run in its own process"
        proc.proc.send_signal(signal.SIGTERM)

        async def ready_status() -> int:
            async with session.get(proc.url + "/ready") as r:
                return r.status

        for _ in range(100):  # "at once": within a few event-loop turns of the signal
            if await ready_status() == 503:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("readiness did not turn false after SIGTERM")
        async with session.post(proc.url + "/v1/completions", json={"model": "tiny", "prompt": "x"}) as refused:
            assert refused.status == 503
            assert (await refused.json())["error"]["code"] == "draining"
        async with session.get(proc.url + "/health") as alive:
            assert alive.status == 200  # liveness holds while draining
        tokens, reason, done = await _read_stream(resp)
        resp.close()
    assert (tokens, reason, done) == (1500, "length", True)
    code = await asyncio.to_thread(proc.proc.wait, 30)
    assert code == 0, proc.log()
    assert "drained" in proc.log()
    await asyncio.to_thread(
        testing.wait_for, "the engine process to exit", lambda: not any(map(testing.is_running, children))
    )


async def test_grace_period_bounds_the_drain(
    start_runtime: Callable[..., Any], process_config: Callable[..., dict[str, Any]]
) -> None:
    proc = start_runtime(process_config(server={"drainGracePeriodS": 0.5}, model={"maxModelLen": 2048}))
    await asyncio.to_thread(proc.wait_ready)
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(proc.url + "/v1/completions", json=body)
        await resp.content.readline()
        proc.proc.send_signal(signal.SIGTERM)
        _, reason, done = await _read_stream(resp)
        resp.close()
    # Cut short (the grace period was far shorter than the request), but closed properly.
    assert (reason, done) == ("abort", True)
    code = await asyncio.to_thread(proc.proc.wait, 30)
    assert code == 0, proc.log()
    assert "grace period" in proc.log()
