"""Every refusal is an OpenAI-shaped error with the right status, naming the parameter where there is one:
400 for malformed or invalid input and prompts over the context, 413 over the body limit, 429 with
Retry-After when a queue is full, 503 while loading or draining; and each is counted by reason."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import test_utils
from prometheus_client import parser

from fleetlm_runtime import config, contract
from fleetlm_runtime.engine import async_engine
from fleetlm_runtime.server import app as app_mod
from fleetlm_runtime.server import state as state_mod


async def _post(server: test_utils.TestServer, path: str, body: Any, **kwargs: Any) -> tuple[int, dict[str, Any], Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{server.port}{path}", data=data, **kwargs) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.json(content_type=None)


def _assert_error(body: dict[str, Any], *, param: str | None) -> None:
    error = body["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["message"] and isinstance(error["message"], str)
    assert error["param"] == param, error


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 5.0}, "max_tokens"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": 2.5}, "temperature"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": "hot"}, "temperature"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 0}, "top_p"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "top_k": -5}, "top_k"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 17}, "n"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "best_of": 2}, "best_of"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"99999999": 1}}, "logit_bias"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "stream": "yes"}, "stream"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": [""]}, "stop"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "seed": -1}, "seed"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
        ("/v1/completions", {"model": "tiny", "prompt": ""}, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": ["a"] * 65}, "prompt"),  # the batch form holds 64 at most
        ("/v1/completions", {"model": "tiny", "prompt": ["a", ""]}, "prompt[1]"),  # the batch form names which
        ("/v1/completions", {"model": "tiny", "prompt": [1, 2, 10**9]}, "prompt"),
        ("/v1/completions", {"model": "tiny"}, "prompt"),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        ("/v1/chat/completions", {"model": "tiny", "messages": []}, "messages"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ("/v1/chat/completions", {"model": "tiny", "messages": "hello"}, "messages"),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{}]},
            "tools[0]",
        ),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}},
            "response_format.type",
        ),
    ],
)
async def test_invalid_parameters_name_the_parameter(
    server: test_utils.TestServer, path: str, body: dict[str, Any], param: str
) -> None:
    status, _, reply = await _post(server, path, body)
    assert status == 400, reply
    _assert_error(reply, param=param)
    assert reply["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "raw",
    [b"{", b"not json", b"", b"[1, 2]", b'"a string"', b"\xff\xfe\x00", b'{"prompt": NaN}', b"[" * 100_000],
)
async def test_malformed_bodies_are_400(server: test_utils.TestServer, raw: bytes) -> None:
    status, _, reply = await _post(server, "/v1/completions", raw)
    assert status == 400
    _assert_error(reply, param=None)


async def test_the_openai_client_sees_bad_request_with_param(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.completions.create(model="tiny", prompt="x", temperature=7)
    assert caught.value.status_code == 400
    assert isinstance(caught.value.body, dict) and caught.value.body.get("param") == "temperature"


async def test_prompt_over_the_context_is_400(server: test_utils.TestServer, client: openai.AsyncOpenAI) -> None:
    max_len = state_mod.max_model_len(server.app[state_mod.state_key].engine)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError) as caught:
        await client.completions.create(model="tiny", prompt=[7] * max_len, max_tokens=1)
    assert caught.value.body["param"] == "prompt"  # type: ignore[index]
    assert "context" in caught.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as caught:
        await client.completions.create(model="tiny", prompt=[7] * 10, max_tokens=max_len)
    assert caught.value.body["param"] == "max_tokens"  # type: ignore[index]
    text = await _metrics(server)
    assert _value(text, contract.REQUESTS_REJECTED, reason=contract.REJECT_TOO_LONG) == 2


async def test_unknown_model_and_route_and_method(server: test_utils.TestServer) -> None:
    status, _, reply = await _post(server, "/v1/completions", {"model": "gpt-9", "prompt": "x"})
    assert status == 404 and reply["error"]["code"] == "model_not_found" and reply["error"]["param"] == "model"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{server.port}/v1/nothing") as resp:
            assert resp.status == 404
            _assert_error(await resp.json(), param=None)
        async with session.get(f"http://127.0.0.1:{server.port}/v1/completions") as resp:
            assert resp.status == 405
            _assert_error(await resp.json(), param=None)


async def test_body_over_the_limit_is_413(
    make_server: Callable[..., Awaitable[test_utils.TestServer]], small_config: Any
) -> None:
    server = await make_server(small_config(server={"maxRequestBodyBytes": 2048}))
    status, _, reply = await _post(server, "/v1/completions", {"model": "tiny", "prompt": "x" * 5000})
    assert status == 413
    _assert_error(reply, param=None)

    # Chunked (no Content-Length): the limit holds while reading, too.
    async def chunks() -> Any:
        for _ in range(10):
            yield b" " * 1024

    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{server.port}/v1/completions", data=chunks()) as resp,
    ):
        assert resp.status == 413
    assert _value(await _metrics(server), contract.REQUESTS_REJECTED, reason=contract.REJECT_TOO_LARGE) == 2


async def test_full_queue_is_429_with_retry_after(
    make_server: Callable[..., Awaitable[test_utils.TestServer]], small_config: Any, wait_until: Any
) -> None:
    # One running slot and a one-request queue: the third concurrent request must be refused.
    cfg = small_config(batching={"maxBatchSize": 1, "maxBatchTokens": 64, "maxQueueLen": 1})
    server = await make_server(cfg)
    state = server.app[state_mod.state_key]
    long_body = {"model": "tiny", "prompt": "a", "max_tokens": 400, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{server.port}/v1/completions"
        first = await session.post(url, json=long_body)
        await first.content.readline()  # the first token: it holds the only slot
        second_task = asyncio.create_task(session.post(url, json=long_body))
        await wait_until("the second request to queue", lambda: state.num_waiting() == 1)
        async with session.post(url, json={"model": "tiny", "prompt": "b", "max_tokens": 1}) as third:
            assert third.status == 429
            assert third.headers["Retry-After"] == str(cfg.server.retry_after_s)
            reply = await third.json()
            assert reply["error"]["type"] == "rate_limit_error" and reply["error"]["code"] == "queue_full"
        first.close()
        (await second_task).close()
    assert _value(await _metrics(server), contract.REQUESTS_REJECTED, reason=contract.REJECT_QUEUE_FULL) == 1


async def test_per_class_queue_limit(
    make_server: Callable[..., Awaitable[test_utils.TestServer]], small_config: Any, wait_until: Any
) -> None:
    qos = {
        "classes": [{"name": "interactive", "priority": 0}, {"name": "batch", "priority": 1, "queueLimit": 1}],
        "defaultClass": "interactive",
        "allowClassHeader": True,
    }
    server = await make_server(small_config(qos=qos, batching={"maxBatchSize": 1, "maxBatchTokens": 64}))
    state = server.app[state_mod.state_key]
    url = f"http://127.0.0.1:{server.port}/v1/completions"
    long_body = {"model": "tiny", "prompt": "a", "max_tokens": 400, "ignore_eos": True, "stream": True}
    batch = {contract.HEADER_QOS_CLASS: "batch"}
    async with aiohttp.ClientSession() as session:
        first = await session.post(url, json=long_body)
        await first.content.readline()
        queued = asyncio.create_task(session.post(url, json=long_body, headers=batch))
        await wait_until("a batch request to queue", lambda: state.num_waiting("batch") == 1)
        async with session.post(url, json={"model": "tiny", "prompt": "b", "max_tokens": 1}, headers=batch) as refused:
            assert refused.status == 429
        # Another class still gets in (it queues behind the running request, then runs).
        other = asyncio.create_task(session.post(url, json={"model": "tiny", "prompt": "c", "max_tokens": 1}))
        await wait_until("the interactive request to queue", lambda: state.num_waiting("interactive") == 1)
        first.close()
        (await queued).close()
        async with await other as resp:
            assert resp.status == 200
    text = await _metrics(server)
    assert _value(text, contract.REQUESTS_REJECTED, reason=contract.REJECT_QUEUE_FULL, qos_class="batch") == 1


async def test_unknown_class_and_class_choice_when_not_allowed(
    make_server: Callable[..., Awaitable[test_utils.TestServer]], small_config: Any
) -> None:
    server = await make_server()  # allowClassHeader is off by default
    status, _, reply = await _post(
        server, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1, "qos_class": "gold"}
    )
    assert status == 400 and reply["error"]["param"] == contract.FIELD_QOS_CLASS
    qos = {"classes": [{"name": "a"}, {"name": "b"}], "defaultClass": "a", "allowClassHeader": True}
    server = await make_server(small_config(qos=qos))
    status, _, reply = await _post(
        server, "/v1/completions", {"model": "tiny", "prompt": "x"}, headers={contract.HEADER_QOS_CLASS: "zzz"}
    )
    assert status == 400 and reply["error"]["param"] == contract.FIELD_QOS_CLASS


async def test_api_keys_pick_the_class_and_can_be_required(
    make_server: Callable[..., Awaitable[test_utils.TestServer]], small_config: Any, tmp_path: Any
) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("key-a: a\nkey-b: b\n")
    qos = {"classes": [{"name": "a"}, {"name": "b"}], "defaultClass": "a", "apiKeysFile": str(keys),
           "requireApiKey": True}  # fmt: skip
    cfg = small_config(qos=qos)
    api_keys = config.load_api_keys(keys, classes={"a", "b"})
    server = await make_server(cfg, api_keys=api_keys)
    body = {"model": "tiny", "prompt": "x", "max_tokens": 1}
    status, _, reply = await _post(server, "/v1/completions", body)
    assert status == 401 and reply["error"]["type"] == "authentication_error"
    status, _, _ = await _post(server, "/v1/completions", body, headers={"Authorization": "Bearer key-b"})
    assert status == 200
    text = await _metrics(server)
    assert _value(text, contract.REQUEST_SUCCESS, qos_class="b", finished_reason="length") == 1


async def test_loading_is_503_and_then_ready(
    make_server: Callable[..., Awaitable[test_utils.TestServer]], small_config: Any
) -> None:
    release = asyncio.Event()
    cfg = small_config()

    async def slow_factory(on_stats: state_mod.StatsCallback) -> async_engine.AsyncEngine:
        await release.wait()
        return await app_mod.default_engine_factory(cfg)(on_stats)

    server = await make_server(cfg, engine_factory=slow_factory, wait_ready=False)
    async with aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{server.port}"
        async with session.get(base + "/health") as resp:
            assert resp.status == 200
        async with session.get(base + "/ready") as resp:
            assert resp.status == 503 and (await resp.json())["status"] == "loading"
        async with session.post(base + "/v1/completions", json={"model": "tiny", "prompt": "x"}) as resp:
            assert resp.status == 503 and "Retry-After" in resp.headers
            reply = await resp.json()
            assert reply["error"]["code"] == "loading"
        release.set()
        await asyncio.wait_for(server.app[app_mod.engine_task_key], 60)
        async with session.get(base + "/ready") as resp:
            assert resp.status == 200
    assert _value(await _metrics(server), contract.REQUESTS_REJECTED, reason=contract.REJECT_LOADING) == 1


async def test_draining_is_503(server: test_utils.TestServer) -> None:
    server.app[state_mod.state_key].start_draining()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}
    status, headers, reply = await _post(server, "/v1/chat/completions", body)
    assert status == 503 and reply["error"]["code"] == "draining" and "Retry-After" in headers
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{server.port}/ready") as resp:
        assert resp.status == 503


# ------------------------------------------------------------------------------------------------


async def _metrics(server: test_utils.TestServer) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{server.port}/metrics") as resp:
        return await resp.text()


def _value(text: str, family: str, **labels: str) -> float:
    total = 0.0
    for fam in parser.text_string_to_metric_families(text):
        if fam.name != family:
            continue
        for sample in fam.samples:
            if sample.name.endswith("_created"):
                continue
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def test_a_dead_engine_fails_requests_and_probes(server: test_utils.TestServer) -> None:
    """If the engine's worker dies, in-flight requests end with an error, and both probes fail so that
    Kubernetes restarts the pod; new requests get 503 rather than hanging."""
    engine = server.app[state_mod.state_key].engine
    assert engine is not None

    def broken_step() -> Any:
        raise RuntimeError("simulated engine crash")

    engine.core.step = broken_step  # type: ignore[method-assign]
    body = {"model": "tiny", "prompt": "x", "max_tokens": 4, "stream": True}
    async with aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{server.port}"
        async with session.post(base + "/v1/completions", json=body) as resp:
            text = await resp.text()
        assert resp.status == 200 and '"error"' in text and "engine stopped" in text and text.endswith("[DONE]\n\n")
        for probe in ("/health", "/ready"):
            async with session.get(base + probe) as r:
                assert r.status == 503, probe
        async with session.post(base + "/v1/completions", json={"model": "tiny", "prompt": "x"}) as resp:
            assert resp.status == 503
