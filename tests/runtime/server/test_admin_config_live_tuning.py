"""PUT /admin/config changes the batch limits live: bearer token required (401 without, 403 when no token
is configured), in-flight streams are not dropped, the engine applies the new limits, and
`fleetlm_config_info` shows them so the operator can confirm the push."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import test_utils
from prometheus_client import parser

from fleetlm_runtime import contract
from fleetlm_runtime.server import state as state_mod

TOKEN = "test-admin-token-0123456789"  # the conftest's ADMIN_TOKEN


async def _admin(
    server: test_utils.TestServer, method: str, body: Any = None, *, token: str | None = TOKEN
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, f"http://127.0.0.1:{server.port}{contract.PATH_ADMIN_CONFIG}", json=body, headers=headers
        ) as resp,
    ):
        return resp.status, await resp.json()


async def _config_info(server: test_utils.TestServer) -> dict[str, str]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{server.port}/metrics") as resp:
        text = await resp.text()
    family = next(f for f in parser.text_string_to_metric_families(text) if f.name == contract.CONFIG_INFO)
    (sample,) = family.samples
    return dict(sample.labels)


async def test_token_is_required(server: test_utils.TestServer) -> None:
    status, body = await _admin(server, "GET", token=None)
    assert status == 401 and body["error"]["type"] == "authentication_error"
    status, _ = await _admin(server, "PUT", {"batching": {"maxBatchSize": 2}}, token="wrong")
    assert status == 401
    status, body = await _admin(server, "GET")
    assert status == 200 and body["config"]["batching"]["maxBatchSize"] == 8


async def test_admin_is_closed_without_a_configured_token(
    make_server: Callable[..., Awaitable[test_utils.TestServer]],
) -> None:
    server = await make_server(admin_token=None)
    status, body = await _admin(server, "PUT", {"batching": {"maxBatchSize": 2}})
    assert status == 403 and body["error"]["type"] == "permission_error"


async def test_put_changes_limits_without_dropping_streams(
    server: test_utils.TestServer, client: openai.AsyncOpenAI
) -> None:
    engine = server.app[state_mod.state_key].engine
    assert engine is not None
    stream = await client.completions.create(
        model="tiny",
        prompt="keep going",
        max_tokens=120,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    usage = None
    changed = False
    async for chunk in stream:
        if not changed:
            status, body = await _admin(server, "PUT", {"batching": {"maxBatchSize": 3, "maxBatchTokens": 96}})
            assert status == 200, body
            assert body["config"]["batching"]["maxBatchSize"] == 3
            changed = True
        if chunk.usage:
            usage = chunk.usage
    assert usage is not None and usage.completion_tokens == 120  # the stream ran to the end
    assert engine.limits == (3, 96)
    assert engine.core.limits.max_batch_size == 3  # applied by the worker before its next step
    info = await _config_info(server)
    assert info["max_batch_size"] == "3" and info["max_batch_tokens"] == "96"
    status, body = await _admin(server, "GET")
    assert body["config"]["batching"] == {**body["config"]["batching"], "maxBatchSize": 3, "maxBatchTokens": 96}
    # A partial update keeps the other limit.
    status, body = await _admin(server, "PUT", {"batching": {"max_batch_size": 2}})
    assert status == 200 and engine.limits == (2, 96)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"batching": {"maxBatchSize": 64, "maxBatchTokens": 32}}, "batching"),
        ({"batching": {"maxBatchSize": 0}}, "batching.maxBatchSize"),
        ({"batching": {"maxBatchSize": "8"}}, "batching.maxBatchSize"),
        ({"batching": {"maxQueueLen": 8}}, "batching.maxQueueLen"),
        ({"model": {"source": "x"}}, "model"),
        ({"batching": {}}, "batching"),
        ([1, 2], None),
    ],
)
async def test_invalid_updates_name_the_field_and_change_nothing(
    server: test_utils.TestServer, body: Any, param: str | None
) -> None:
    status, reply = await _admin(server, "PUT", body)
    assert status == 400 and reply["error"]["param"] == param, reply
    info = await _config_info(server)
    assert info["max_batch_size"] == "8" and info["max_batch_tokens"] == "256"
