"""When replicas go: a stream cut mid-way ends with an error event and new requests go elsewhere; with
none left the router holds within its bounds and then answers 503 with Retry-After and the reason; from
zero it asks for a replica, streams get SSE comments while they wait, and the request is served."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal

import aiohttp

from fleetlm_dev import bench_router, testing
from fleetlm_runtime import contract

LONG = {"model": "tiny", "prompt": list(range(20, 60)), "max_tokens": 400, "ignore_eos": True, "temperature": 0,
        "stream": True}  # fmt: skip


async def test_a_replica_killed_mid_stream_ends_it_with_an_error_and_new_requests_go_elsewhere(
    replicas, start_replica, make_router
) -> None:
    victim = start_replica()
    router = await make_router([victim.url, replicas[0].url], policy="round-robin")
    victim_name = bench_router.endpoints_name(victim.url)
    events: list[dict] = []
    async with aiohttp.ClientSession() as session:
        # Round-robin in name order: find the victim's turn by sending until it serves one.
        async with session.post(router.url + "/v1/completions", json=LONG) as resp:
            if resp.headers["X-FleetLM-Replica"] != victim_name:
                await resp.read()
                resp2 = await session.post(router.url + "/v1/completions", json=LONG)
            else:
                resp2 = resp
            assert resp2.headers["X-FleetLM-Replica"] == victim_name
            got_first = False
            async for raw in resp2.content:
                line = raw.strip()
                if line.startswith(b"data: {"):
                    events.append(json.loads(line[6:]))
                    if not got_first:
                        got_first = True
                        for child in testing.children_of(victim.proc.pid):  # the engine process too
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(child, signal.SIGKILL)
                        victim.kill()
            resp2.release()
        assert "choices" in events[0]
        assert events[-1]["error"]["code"] == "replica_lost"
        assert victim_name in events[-1]["error"]["message"]
        # The replica's endpoint is still listed (as when a pod dies before its EndpointSlice updates):
        # new requests are retried onto the live one before their first byte.
        for _ in range(3):
            async with session.post(router.url + "/v1/completions", json={**LONG, "max_tokens": 2}) as resp:
                assert resp.status == 200
                assert resp.headers["X-FleetLM-Replica"] == bench_router.endpoints_name(replicas[0].url)
                await resp.read()
    assert router.state.metrics.upstream_lost._value.get() == 1


async def test_all_replicas_gone_holds_then_503_with_retry_after_and_why(replicas, make_router) -> None:
    router = await make_router([replicas[0].url], hold_timeout_s=0.6)
    router.set_replicas([])
    await router.wait_replicas(0)
    async with aiohttp.ClientSession() as session:
        started = asyncio.get_running_loop().time()
        async with session.post(router.url + "/v1/completions", json={**LONG, "stream": False}) as resp:
            waited = asyncio.get_running_loop().time() - started
            assert resp.status == 503
            assert int(resp.headers["Retry-After"]) >= 1
            error = (await resp.json())["error"]
        assert error["code"] == "no_replica" and "no replica became ready within 0.6s" in error["message"]
        assert waited >= 0.6
        async with session.post(router.url + "/v1/completions", json=LONG) as resp:
            assert resp.status == 200  # a stream was promised while it waited
            body = await resp.read()
        assert b": waiting for a replica" in body
        last = [line for line in body.split(b"\n\n") if line.startswith(b"data: ")][-1]
        assert json.loads(last[6:])["error"]["code"] == "no_replica"
    assert '"scale_up"' in router.scale_file.read_text()  # it asked for a replica while holding


async def test_holding_is_bounded_in_count(replicas, make_router) -> None:
    router = await make_router([], hold_max_requests=2, hold_timeout_s=3.0)
    async with aiohttp.ClientSession() as session:
        body = {**LONG, "stream": False, "max_tokens": 2}
        held = [asyncio.create_task(session.post(router.url + "/v1/completions", json=body)) for _ in range(2)]
        for _ in range(100):
            if router.state.metrics.held._value.get() == 2:
                break
            await asyncio.sleep(0.02)
        async with session.post(router.url + "/v1/completions", json=body) as resp:
            assert resp.status == 429 and resp.headers["Retry-After"]
            assert (await resp.json())["error"]["code"] == "queue_full"
        router.set_replicas([replicas[0].url])  # a replica arrives: the held requests are served
        for task in held:
            resp = await task
            assert resp.status == 200, await resp.text()
            resp.release()


async def test_from_zero_a_held_stream_gets_comments_then_tokens(replicas, make_router) -> None:
    router = await make_router([], hold_timeout_s=30.0, hold_comment_interval_s=0.1)
    async with (
        aiohttp.ClientSession() as session,
        session.post(router.url + "/v1/completions", json={**LONG, "max_tokens": 5}) as resp,
    ):
        assert resp.status == 200
        first = await resp.content.readuntil(b"\n\n")
        assert first.startswith(b": waiting for a replica")
        for _ in range(200):
            if router.scale_file.exists() and '"scale_up"' in router.scale_file.read_text():
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the router did not ask for a replica")
        router.set_replicas([replicas[1].url])  # the "operator" brought one up
        rest = await resp.read()
    data = [json.loads(line[6:]) for line in rest.split(b"\n\n") if line.startswith(b"data: {")]
    assert sum(len(d["choices"]) for d in data if d.get("choices")) >= 1
    assert rest.endswith(b"data: [DONE]\n\n")
    assert router.state.metrics.hold_seconds.labels("served")._sum.get() > 0


async def test_a_rotated_api_key_takes_its_new_class_at_the_edge(make_router, qos_rules, tmp_path) -> None:
    """Keys resolve to classes here as at the runtime, and a rotated Secret is followed without a restart:
    the same key, moved to a shed class, is refused at the edge instead of being held for a replica."""
    keys = tmp_path / "keys.yaml"
    keys.write_text("k-1: interactive\n")
    router = await make_router([], qos={**qos_rules, "shedClasses": ["batch"]}, api_keys_file=keys,
                               hold_timeout_s=0.3)  # fmt: skip
    auth = {"Authorization": "Bearer k-1"}
    body = {"model": "tiny", "prompt": "x", "max_tokens": 1}
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + "/v1/completions", json=body, headers=auth) as resp:
            assert resp.status == 503  # interactive: held for a replica, none came
        keys.write_text("k-1: batch\n")
        for _ in range(100):
            if router.state.api_keys.get("k-1") == "batch":
                break
            await asyncio.sleep(0.05)
        async with session.post(router.url + "/v1/completions", json=body, headers=auth) as resp:
            assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
            assert (await resp.json())["error"]["code"] == contract.CODE_CLASS_SHED
        keys.write_text("k-1: nonexistent\n")  # refused whole: the keys in force stay
        await asyncio.sleep(2.5)
        assert router.state.api_keys == {"k-1": "batch"}
