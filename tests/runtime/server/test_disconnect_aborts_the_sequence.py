"""A client that goes away aborts its sequence at once: the engine's running set and KV usage return to
zero, /metrics says so, and the abort is counted. Covers a stream closed mid-way (with the engine core on
a thread and in its own process), a plain request whose client times out, and a request still waiting in
the queue."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import test_utils
from prometheus_client import parser

from fleetlm_runtime import contract
from fleetlm_runtime.server import state as state_mod

LONG = {"ignore_eos": True}


def _engine_idle(server: test_utils.TestServer) -> bool:
    engine = server.app[state_mod.state_key].engine
    assert engine is not None
    if engine.executor_kind == "process":  # the core's own state is in the other process: what it reported
        return engine.num_unfinished == 0 and engine.kv_usage == 0.0
    sched = engine.core.scheduler
    return sched.num_running == 0 and sched.num_waiting == 0 and engine.core.kv_usage == 0.0


async def _scrape(server: test_utils.TestServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{server.port}/metrics") as resp:
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in parser.text_string_to_metric_families(text)
        for s in fam.samples
    }


def _get(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all((k, v2) in ls for k, v2 in labels.items()))


@pytest.mark.parametrize("engine_process", [False, True], ids=["core-thread", "core-process"])
async def test_closing_a_stream_mid_way_frees_the_sequence_and_kv(
    engine_process: bool,
    make_server: Callable[..., Awaitable[test_utils.TestServer]],
    small_config: Any,
    make_client: Callable[..., openai.AsyncOpenAI],
    wait_until: Callable[..., Awaitable[None]],
) -> None:
    server = await make_server(small_config(server={"engineProcess": engine_process}))
    client = make_client(server)
    engine = server.app[state_mod.state_key].engine
    assert engine is not None
    assert engine.executor_kind == ("process" if engine_process else "thread")
    stream = await client.completions.create(
        model="tiny", prompt="Tell me a long story", max_tokens=450, stream=True, extra_body=LONG
    )
    received = 0
    async for chunk in stream:
        received += 1 if chunk.choices and chunk.choices[0].text else 0
        if received >= 3:
            break
    assert _get(await _scrape(server), contract.NUM_REQUESTS_RUNNING) == 1 and engine.kv_usage > 0
    await stream.close()  # what a user's code does when it stops reading

    await wait_until("the engine to drop the sequence and its KV", lambda: _engine_idle(server))
    samples = await _scrape(server)
    assert _get(samples, contract.NUM_REQUESTS_RUNNING) == 0
    assert _get(samples, contract.KV_CACHE_USAGE_PERC) == 0
    # The abort itself is reported with the next engine step; run one to flush it.
    await client.completions.create(model="tiny", prompt="x", max_tokens=1)
    samples = await _scrape(server)
    assert _get(samples, contract.sample_name(contract.REQUEST_SUCCESS), finished_reason="abort") == 1


async def test_a_plain_request_whose_client_gives_up_is_aborted(
    make_server: Callable[..., Awaitable[test_utils.TestServer]],
    small_config: Any,
    make_client: Callable[..., openai.AsyncOpenAI],
    wait_until: Callable[..., Awaitable[None]],
) -> None:
    server = await make_server(small_config(model={"maxModelLen": 2048}))
    impatient = make_client(server, timeout=0.3)
    engine = server.app[state_mod.state_key].engine
    assert engine is not None
    try:  # 2,000 tokens take seconds even on a fast machine; the client gives up after 0.3 s
        await impatient.completions.create(model="tiny", prompt="x", max_tokens=2000, extra_body=LONG)
        raise AssertionError("the request should have timed out")  # pragma: no cover
    except openai.APITimeoutError:
        pass
    await wait_until("the abandoned request to be aborted", lambda: _engine_idle(server))
    assert engine.num_unfinished == 0
    assert server.app[state_mod.state_key].num_inflight == 0


async def test_a_queued_request_whose_client_leaves_is_removed(
    make_server: Callable[..., Awaitable[test_utils.TestServer]],
    small_config: Any,
    wait_until: Callable[..., Awaitable[None]],
) -> None:
    server = await make_server(small_config(batching={"maxBatchSize": 1, "maxBatchTokens": 64}))
    state = server.app[state_mod.state_key]
    url = f"http://127.0.0.1:{server.port}/v1/completions"
    body = {"model": "tiny", "prompt": "a", "max_tokens": 400, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as session:
        running = await session.post(url, json=body)
        await running.content.readline()
        queued = asyncio.create_task(session.post(url, json=body))
        await wait_until("the second request to queue", lambda: state.num_waiting() == 1)
        queued.cancel()  # the client hangs up before its request was ever scheduled
        await wait_until("the queued request to leave", lambda: state.num_waiting() == 0 and state.num_inflight == 1)
        running.close()
    await wait_until("the engine to be idle", lambda: _engine_idle(server))
    assert state.num_inflight == 0
