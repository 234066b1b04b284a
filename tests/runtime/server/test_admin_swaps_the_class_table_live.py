"""PUT /admin/config swaps the QoS class table live: classes added, removed and reweighted, the default class
and the SLO targets, applied to the next request without a restart. A request admitted under a class that
is then removed is served to its end with the priority it was admitted with; a request of a removed class
gets a clear refusal, never a 5xx; a table that would leave API keys without their class is refused and
changes nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import test_utils
from prometheus_client import parser

from fleetlm_runtime import config, contract, qos
from fleetlm_runtime.server import state as state_mod

TOKEN = "test-admin-token-0123456789"  # the conftest's ADMIN_TOKEN

CLASSES = [
    {"name": "interactive", "priority": 0, "ttftTargetS": 1.0},
    {"name": "bulk", "priority": 5, "sheddable": True},
]


async def _request(
    server: test_utils.TestServer, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"http://127.0.0.1:{server.port}{path}", json=body, headers=headers or {}) as resp,
    ):
        return resp.status, json.loads(await resp.text())


async def _admin(server: test_utils.TestServer, body: Any = None) -> tuple[int, dict[str, Any]]:
    method = "GET" if body is None else "PUT"
    return await _request(server, method, contract.PATH_ADMIN_CONFIG, body, {"Authorization": f"Bearer {TOKEN}"})


async def _complete(server: test_utils.TestServer, qos_class: str | None = None, **extra: Any) -> tuple[int, Any]:
    headers = {contract.HEADER_QOS_CLASS: qos_class} if qos_class else {}
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, **extra}
    return await _request(server, "POST", "/v1/completions", body, headers)


async def _config_info(server: test_utils.TestServer) -> dict[str, str]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{server.port}/metrics") as resp:
        text = await resp.text()
    family = next(f for f in parser.text_string_to_metric_families(text) if f.name == contract.CONFIG_INFO)
    (sample,) = family.samples
    return dict(sample.labels)


def _with_classes(small_config: Callable[..., config.RuntimeConfig]) -> config.RuntimeConfig:
    return small_config(qos={"classes": CLASSES, "defaultClass": "interactive", "allowClassHeader": True})


async def test_classes_are_added_reweighted_and_retargeted_live(
    make_server: Callable[..., Awaitable[test_utils.TestServer]], small_config: Callable[..., config.RuntimeConfig]
) -> None:
    server = await make_server(_with_classes(small_config))
    state = server.app[state_mod.state_key]
    engine_before = state.engine
    status, _ = await _complete(server, "batch-new")
    assert status == 400  # not a class yet

    table = [
        {"name": "interactive", "priority": 0, "weight": 3, "ttftTargetS": 0.25},
        {"name": "standard", "priority": 1},
        {"name": "bulk", "priority": 5, "sheddable": True},
        {"name": "batch-new", "priority": 9, "sheddable": True},
    ]
    status, view = await _admin(server, {"qos": {"classes": table, "defaultClass": "standard"}})
    assert status == 200, view
    assert [c["name"] for c in view["config"]["qos"]["classes"]] == ["interactive", "standard", "bulk", "batch-new"]
    assert view["config"]["qos"]["defaultClass"] == "standard"
    in_force = state.config.qos.by_name()
    assert in_force["interactive"].weight == 3 and in_force["interactive"].ttft_target_s == 0.25
    assert state.engine is engine_before  # the same engine: nothing restarted

    status, body = await _complete(server, "batch-new")
    assert status == 200, body
    status, body = await _complete(server)  # no class named: the new default
    assert status == 200, body
    info = await _config_info(server)
    assert info["qos_classes"] == "interactive,standard,bulk,batch-new"
    assert info["default_qos_class"] == "standard"


async def test_a_removed_class_finishes_what_it_admitted_and_refuses_new_requests(
    make_server: Callable[..., Awaitable[test_utils.TestServer]],
    small_config: Callable[..., config.RuntimeConfig],
    wait_until: Callable[..., Awaitable[None]],
) -> None:
    server = await make_server(_with_classes(small_config))
    state = server.app[state_mod.state_key]
    long_request = asyncio.create_task(_complete(server, "bulk", max_tokens=200, ignore_eos=True))
    # A handler enters `inflight` and is admitted in the same step of the event loop (no await between).
    await wait_until("the request admitted", lambda: bool(state.inflight))
    status, view = await _admin(server, {"qos": {"classes": [CLASSES[0]]}})
    assert status == 200, view
    assert state.config.qos.shed_classes == []
    status, body = await long_request
    assert status == 200 and body["usage"]["completion_tokens"] == 200  # served to its end
    status, body = await _complete(server, "bulk")
    assert status == 400 and body["error"]["param"] == contract.FIELD_QOS_CLASS, body
    status, body = await _complete(server, "interactive")
    assert status == 200, body


def test_a_request_given_a_class_removed_before_admission_is_refused_with_a_retry() -> None:
    settings = config.QoSSettings.model_validate({"classes": [CLASSES[0]], "defaultClass": "interactive"})
    verdict = qos.admit("bulk", qos=settings, max_queue_len=8, load={})
    assert not verdict.admit and verdict.code == contract.CODE_CLASS_SHED and "no longer" in verdict.message


async def test_invalid_class_tables_name_the_field_and_change_nothing(
    make_server: Callable[..., Awaitable[test_utils.TestServer]], small_config: Callable[..., config.RuntimeConfig]
) -> None:
    server = await make_server(
        _with_classes(small_config), api_keys={"key-bulk": "bulk", "key-interactive": "interactive"}
    )
    state = server.app[state_mod.state_key]
    before = state.config
    cases: list[tuple[dict[str, Any], str]] = [
        ({"qos": {"classes": []}}, "qos.classes"),
        ({"qos": {"classes": "interactive"}}, "qos.classes"),
        ({"qos": {"classes": [{"name": "interactive", "weight": -1}]}}, "qos.classes.0.weight"),
        ({"qos": {"classes": [{"name": "interactive"}, {"name": "interactive"}]}}, "qos"),
        ({"qos": {"defaultClass": "nope"}}, "qos"),
        ({"qos": {"classes": [CLASSES[0]], "shedClasses": ["bulk"]}}, "qos"),
        ({"qos": {"allowClassHeader": "yes"}}, "qos.allowClassHeader"),
        # the key file still maps key-bulk to bulk: dropping bulk would leave that key without a class
        ({"qos": {"classes": [CLASSES[0]]}}, "qos.classes"),
    ]
    for body, param in cases:
        status, reply = await _admin(server, body)
        assert status == 400 and reply["error"]["param"] == param, (body, reply)
        assert state.config == before, body
