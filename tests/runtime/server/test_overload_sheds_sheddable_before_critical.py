"""Under overload the sheddable class gets 429 with Retry-After while critical keeps being served: once a
critical request has waited half its TTFT target, new sheddable requests are refused (a protected class
without a target is still admitted), and the critical one completes. The operator's `shedClasses` push
refuses a class outright, shows in config_info and GET /admin/config, and is refused for a protected class."""

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
from fleetlm_runtime.server import app as app_mod
from fleetlm_runtime.server import state as state_mod

TOKEN = "test-admin-token-0123456789"  # the conftest's ADMIN_TOKEN
QOS = {
    "classes": [
        {"name": "critical", "priority": 0, "ttftTargetS": 0.4},
        {"name": "standard", "priority": 1},
        {"name": "sheddable", "priority": 2, "sheddable": True},
    ],
    "defaultClass": "critical",
    "allowClassHeader": True,
    "shedding": {"windowS": 0.5},  # how long a slow critical TTFT keeps sheddable traffic out
}
LONG = {"model": "tiny", "prompt": "a", "max_tokens": 400, "ignore_eos": True, "stream": True}
SHORT = {"model": "tiny", "prompt": "b", "max_tokens": 2}


def _slowed_engine(cfg: Any) -> state_mod.EngineFactory:
    """The real engine, each step made 5 ms slower (as on a bigger model), so that the long request still
    holds the only slot while the test watches the critical one wait, however fast this machine is."""
    build = app_mod.default_engine_factory(cfg)

    async def slowed(on_stats: state_mod.StatsCallback) -> Any:
        engine = await build(on_stats)
        step = engine.core.step

        def slow_step() -> Any:
            time.sleep(0.005)
            return step()

        engine.core.step = slow_step  # type: ignore[method-assign]
        return engine

    return slowed


def _as(qos_class: str) -> dict[str, str]:
    return {contract.HEADER_QOS_CLASS: qos_class}


async def _rejected(server: test_utils.TestServer) -> dict[tuple[str, str], float]:
    """429s counted so far, by (class, cause)."""
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{server.port}/metrics") as resp:
        text = await resp.text()
    out: dict[tuple[str, str], float] = {}
    for family in parser.text_string_to_metric_families(text):
        if family.name == contract.REQUESTS_REJECTED:
            for s in family.samples:
                if s.labels["reason"] in contract.REJECT_REASONS_OVERLOAD and s.value:
                    key = (s.labels["qos_class"], s.labels["reason"])
                    out[key] = out.get(key, 0) + s.value
    return out


async def test_sheddable_is_refused_while_critical_waits_and_critical_succeeds(
    make_server: Callable[..., Awaitable[test_utils.TestServer]], small_config: Any, wait_until: Any
) -> None:
    # One batch slot: a long request holds it, so whatever comes next waits.
    cfg = small_config(qos=QOS, batching={"maxBatchSize": 1, "maxBatchTokens": 64})
    server = await make_server(cfg, engine_factory=_slowed_engine(cfg))
    state = server.app[state_mod.state_key]
    url = f"http://127.0.0.1:{server.port}/v1/completions"
    async with aiohttp.ClientSession() as session:
        # Before any pressure, sheddable traffic is served like the rest.
        async with session.post(url, json=SHORT, headers=_as("sheddable")) as resp:
            assert resp.status == 200
        # A critical stream holds the only slot: an equal class cannot preempt it, so the next critical
        # request really waits (a lower-class holder would simply be preempted).
        holder = await session.post(url, json=LONG, headers=_as("critical"))
        await holder.content.readline()  # its first token: it holds the only slot
        critical = asyncio.create_task(session.post(url, json=SHORT, headers=_as("critical")))
        await wait_until("a critical request to queue", lambda: state.num_waiting("critical") == 1)
        await asyncio.sleep(0.25)  # over half of critical's 0.4 s target
        async with session.post(url, json=SHORT, headers=_as("sheddable")) as refused:
            assert refused.status == 429
            assert refused.headers["Retry-After"] == str(cfg.server.retry_after_s)
            error = (await refused.json())["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == contract.CODE_SLO_SHED
            assert "critical" in error["message"]
        # A protected class is not shed: it queues (and runs once the slot frees).
        standard = asyncio.create_task(session.post(url, json=SHORT, headers=_as("standard")))
        await wait_until("the standard request to queue", lambda: state.num_waiting("standard") == 1)
        holder.close()
        async with await critical as resp:
            assert resp.status == 200
            assert (await resp.json())["usage"]["completion_tokens"] == 2
        async with await standard as resp:
            assert resp.status == 200
        # The pressure goes with the queue and the recent TTFTs: sheddable requests are served again.
        await wait_until("the pressure to pass", lambda: state.admit("sheddable").admit, timeout_s=5)
        async with session.post(url, json=SHORT, headers=_as("sheddable")) as resp:
            assert resp.status == 200
    assert await _rejected(server) == {("sheddable", contract.REJECT_SHED_SLO): 1}


async def _admin(server: test_utils.TestServer, method: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            f"http://127.0.0.1:{server.port}{contract.PATH_ADMIN_CONFIG}",
            json=body,
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as resp,
    ):
        return resp.status, await resp.json()


async def _config_info(server: test_utils.TestServer) -> dict[str, str]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{server.port}/metrics") as resp:
        text = await resp.text()
    family = next(f for f in parser.text_string_to_metric_families(text) if f.name == contract.CONFIG_INFO)
    return dict(family.samples[0].labels)


async def test_the_operator_push_sheds_a_class_live(
    make_server: Callable[..., Awaitable[test_utils.TestServer]], small_config: Any
) -> None:
    server = await make_server(small_config(qos=QOS))
    url = f"http://127.0.0.1:{server.port}/v1/completions"
    # Exactly what the operator's tuner pushes (a part of fleetlm_operator.act.push.live_body).
    push = {"batching": {"maxBatchSize": 6, "maxBatchTokens": 200}, "qos": {"shedClasses": ["sheddable"]}}
    status, view = await _admin(server, "PUT", push)
    assert status == 200, view
    assert view["config"]["qos"]["shedClasses"] == ["sheddable"]
    assert view["config"]["batching"]["maxBatchSize"] == 6
    assert "qos.shedClasses" in view["liveFields"]
    info = await _config_info(server)
    assert info["shed_classes"] == "sheddable" and info["max_batch_size"] == "6" and info["qos_policy"] == "priority"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=SHORT, headers=_as("sheddable")) as resp:
            assert resp.status == 429 and "Retry-After" in resp.headers
            assert json.loads(await resp.text())["error"]["code"] == contract.CODE_CLASS_SHED
        async with session.post(url, json=SHORT, headers=_as("standard")) as resp:
            assert resp.status == 200
    # The metric names the cause, as the body's code does: shed by the tuner, not by the runtime's guard.
    assert await _rejected(server) == {("sheddable", contract.REJECT_SHED_TUNER): 1}
    # A protected or unknown class cannot be shed; nothing changes.
    for bad in (["critical"], ["nope"], "sheddable", [1]):
        status, reply = await _admin(server, "PUT", {"qos": {"shedClasses": bad}})
        assert status == 400 and reply["error"]["param"] == "qos.shedClasses", reply
    status, reply = await _admin(server, "PUT", {"qos": {"classes": []}})
    assert status == 400 and reply["error"]["param"] == "qos.classes"
    assert (await _config_info(server))["shed_classes"] == "sheddable"
    # Taking it back.
    status, view = await _admin(server, "PUT", {"qos": {"shedClasses": []}})
    assert status == 200 and (await _config_info(server))["shed_classes"] == ""
    async with aiohttp.ClientSession() as session, session.post(url, json=SHORT, headers=_as("sheddable")) as resp:
        assert resp.status == 200


async def _open(session: aiohttp.ClientSession, url: str, body: dict[str, Any], qos_class: str) -> asyncio.Task[Any]:
    return asyncio.create_task(session.post(url, json=body, headers=_as(qos_class)))


async def test_waiting_requests_of_a_class_shed_live_get_429_not_a_cut_stream(
    make_server: Callable[..., Awaitable[test_utils.TestServer]], small_config: Any, wait_until: Any
) -> None:
    """A sheddable request still waiting when the operator sheds its class is refused like one at the door:
    its response had not begun (it begins with the first token), so the client gets 429 with Retry-After and
    the cause, streamed or not, and nothing of it stays in the engine."""
    cfg = small_config(qos=QOS, batching={"maxBatchSize": 1, "maxBatchTokens": 64})
    server = await make_server(cfg, engine_factory=_slowed_engine(cfg))
    state = server.app[state_mod.state_key]
    url = f"http://127.0.0.1:{server.port}/v1/completions"
    async with aiohttp.ClientSession() as session:
        holder = await session.post(url, json=LONG, headers=_as("critical"))
        await holder.content.readline()  # it holds the only slot
        waiting = [await _open(session, url, {**SHORT, "stream": stream}, "sheddable") for stream in (True, False)]
        await wait_until("both sheddable requests to queue", lambda: state.num_waiting("sheddable") == 2)
        status, _ = await _admin(server, "PUT", {"qos": {"shedClasses": ["sheddable"]}})
        assert status == 200
        for task in waiting:
            async with await task as resp:
                assert resp.status == 429, await resp.text()
                assert resp.headers["Retry-After"] == str(cfg.server.retry_after_s)
                error = (await resp.json())["error"]
                assert error["code"] == contract.CODE_CLASS_SHED and "sheddable" in error["message"]
        assert state.num_waiting() == 0 and not state.waiting_streams and not state.evicted
        holder.close()
    await wait_until("the engine to be idle", lambda: state.engine is not None and state.engine.num_unfinished == 0)
    assert await _rejected(server) == {("sheddable", contract.REJECT_SHED_TUNER): 2}


async def test_a_full_queue_displaces_the_newest_lower_class_request_for_a_critical_one(
    make_server: Callable[..., Awaitable[test_utils.TestServer]], small_config: Any, wait_until: Any
) -> None:
    """With the queue at its bound, a critical request is admitted and the newest waiting request of the
    lowest class below it is refused (429 queue_full, saying it was displaced); an equal or lower class
    arriving at the full queue is refused as before, and every admitted request completes."""
    cfg = small_config(qos=QOS, batching={"maxBatchSize": 1, "maxBatchTokens": 64, "maxQueueLen": 2})
    server = await make_server(cfg, engine_factory=_slowed_engine(cfg))
    state = server.app[state_mod.state_key]
    url = f"http://127.0.0.1:{server.port}/v1/completions"
    async with aiohttp.ClientSession() as session:
        holder = await session.post(url, json=LONG, headers=_as("critical"))
        await holder.content.readline()
        older = await _open(session, url, {**SHORT, "stream": True}, "standard")
        await wait_until("one standard request to queue", lambda: state.num_waiting("standard") == 1)
        newer = await _open(session, url, {**SHORT, "stream": True}, "standard")
        await wait_until("the queue to be full", lambda: state.num_waiting() == 2)
        async with session.post(url, json=SHORT, headers=_as("standard")) as refused:
            assert refused.status == 429  # nothing below standard waits: refused at the door
            assert "displaced" not in (await refused.json())["error"]["message"]
        critical = await _open(session, url, SHORT, "critical")
        async with await newer as resp:
            assert resp.status == 429 and resp.headers["Retry-After"]
            error = (await resp.json())["error"]
            assert (
                error["code"] == contract.CODE_QUEUE_FULL
                and "displaced by a request of class 'critical'" in error["message"]
            )
        assert state.num_waiting("critical") == 1 and state.num_waiting("standard") == 1
        holder.close()
        async with await critical as resp:
            assert resp.status == 200 and (await resp.json())["usage"]["completion_tokens"] == 2
        async with await older as resp:
            assert resp.status == 200 and (await resp.text()).rstrip().endswith("data: [DONE]")
    await wait_until("the engine to be idle", lambda: state.engine is not None and state.engine.num_unfinished == 0)
    assert await _rejected(server) == {("standard", contract.REJECT_QUEUE_FULL): 2}
