"""The response cache end to end: an exact repeat of a deterministic request is replayed, as JSON or as a
normal SSE stream the official client parses, without reaching the engine; sampled requests never use it;
any changed parameter, model detail or tenant misses; identical requests in flight are computed once and
an aborted leader does not poison the others; it can be switched off, and live config changes empty it
only when they could change an output. Engine work is counted from /metrics (request_success)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import test_utils
from prometheus_client import parser

from fleetlm_runtime import config, contract
from fleetlm_runtime import metrics as metrics_mod
from fleetlm_runtime.__main__ import build_parser, config_from_args
from fleetlm_runtime.engine import request as request_mod
from fleetlm_runtime.server import response_cache
from fleetlm_runtime.server import state as state_mod
from fleetlm_runtime.structured import spec as structured_spec

TOKEN = "test-admin-token-0123456789"  # the conftest's ADMIN_TOKEN
CACHE_ON = {"responseCache": {"enabled": True, "maxEntries": 64, "ttlS": 300}}
GREEDY = {"model": "tiny", "temperature": 0.0, "extra_body": {"ignore_eos": True}}
HEADER = contract.HEADER_RESPONSE_CACHE
MakeServer = Callable[..., Awaitable[test_utils.TestServer]]


async def _counts(server: test_utils.TestServer) -> dict[str, float]:
    """Engine computations (finished requests by reason) and cache lookups (hit/miss)."""
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{server.port}/metrics") as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for family in parser.text_string_to_metric_families(text):
        for s in family.samples:
            if family.name == contract.REQUEST_SUCCESS:
                out[s.labels["finished_reason"]] = out.get(s.labels["finished_reason"], 0) + s.value
            elif family.name == contract.RESPONSE_CACHE_LOOKUPS:
                out[s.labels["result"]] = s.value
    return {k: v for k, v in out.items() if v}


@pytest.fixture
async def cached(make_server: MakeServer, small_config: Any) -> test_utils.TestServer:
    return await make_server(small_config(caching=CACHE_ON))


async def test_a_repeat_is_replayed_not_recomputed(
    cached: test_utils.TestServer, make_client: Callable[..., openai.AsyncOpenAI]
) -> None:
    client = make_client(cached)
    first = await client.completions.with_raw_response.create(prompt="The cache", max_tokens=12, **GREEDY)
    second = await client.completions.with_raw_response.create(prompt="The cache", max_tokens=12, **GREEDY)
    assert first.headers[HEADER] == contract.RESPONSE_CACHE_MISS
    assert second.headers[HEADER] == contract.RESPONSE_CACHE_HIT
    a, b = first.parse(), second.parse()
    assert a.choices[0].text == b.choices[0].text and a.choices[0].finish_reason == b.choices[0].finish_reason
    assert a.usage == b.usage and b.usage is not None and b.usage.completion_tokens == 12
    assert a.id != b.id and b.object == "text_completion" and b.model == "tiny"
    assert await _counts(cached) == {"length": 1, "hit": 1, "miss": 1}


async def test_streamed_hits_are_normal_sse_streams(
    cached: test_utils.TestServer, make_client: Callable[..., openai.AsyncOpenAI]
) -> None:
    client = make_client(cached)
    messages = [{"role": "user", "content": "Tell me about caches."}]
    plain = await client.chat.completions.create(messages=messages, max_tokens=10, **GREEDY)  # type: ignore[arg-type]
    store = cached.app[state_mod.state_key].response_cache
    assert store is not None and len(store) == 1
    # The pieces the engine delivered: one per step, fewer when the server read several steps at once (a
    # busy machine merges them, as vLLM's output collector does).
    recorded = next(iter(store._entries.values())).value.pieces
    raw = await client.chat.completions.with_raw_response.create(
        messages=messages,  # type: ignore[arg-type]
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    assert raw.headers[HEADER] == contract.RESPONSE_CACHE_HIT
    assert raw.headers["Content-Type"].startswith("text/event-stream")
    chunks = [chunk async for chunk in raw.parse()]
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == plain.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])
    # Replayed in the pieces it was generated in (after the role's own chunk), not as one blob.
    assert [c.choices[0].delta.content for c in chunks[1:] if c.choices] == list(recorded), recorded
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens  # type: ignore[union-attr]
    assert all(c.object == "chat.completion.chunk" for c in chunks)

    # A stream computed first (the leader streams), then replayed to a plain and a streaming client.
    kwargs: dict[str, Any] = {"prompt": "Streams first", "max_tokens": 9, **GREEDY}
    live = [c async for c in await client.completions.create(**kwargs, stream=True)]
    again = [c async for c in await client.completions.create(**kwargs, stream=True)]
    plain_again = await client.completions.create(**kwargs)
    live_text = "".join(c.choices[0].text for c in live)
    assert "".join(c.choices[0].text for c in again) == live_text == plain_again.choices[0].text
    assert again[-1].choices[0].finish_reason == "length"
    assert await _counts(cached) == {"length": 2, "hit": 3, "miss": 2}


async def test_raw_sse_framing_of_a_hit(cached: test_utils.TestServer) -> None:
    body = {"model": "tiny", "prompt": "frame", "max_tokens": 4, "temperature": 0, "stream": True}
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{cached.port}/v1/completions"
        async with session.post(url, json=body) as resp:
            miss = await resp.text()
        async with session.post(url, json=body) as resp:
            hit = await resp.text()
            assert resp.headers["Cache-Control"] == "no-cache"
    for text in (miss, hit):
        events = text.split("\n\n")
        assert events[-1] == "" and events[-2] == "data: [DONE]"
        assert all(e.startswith("data: ") for e in events[:-1])
    texts = [[json.loads(e[6:])["choices"][0]["text"] for e in t.split("\n\n")[:-2]] for t in (miss, hit)]
    assert "".join(texts[0]) == "".join(texts[1])


async def test_sampled_requests_never_use_the_cache_but_seeded_ones_do(
    cached: test_utils.TestServer, make_client: Callable[..., openai.AsyncOpenAI]
) -> None:
    client = make_client(cached)
    sampled: dict[str, Any] = {"model": "tiny", "prompt": "Dice", "max_tokens": 6, "temperature": 1.0}
    for _ in range(2):
        raw = await client.completions.with_raw_response.create(**sampled)
        assert HEADER not in raw.headers
    seeded = {**sampled, "seed": 11}
    first = await client.completions.with_raw_response.create(**seeded)
    second = await client.completions.with_raw_response.create(**seeded)
    assert [first.headers[HEADER], second.headers[HEADER]] == ["miss", "hit"]
    assert first.parse().choices[0].text == second.parse().choices[0].text
    assert await _counts(cached) == {"length": 3, "hit": 1, "miss": 1}


@pytest.mark.parametrize(
    "change",
    [
        {"max_tokens": 7},
        {"temperature": 0.5, "seed": 3},
        {"top_p": 0.5},
        {"extra_body": {"ignore_eos": True, "top_k": 5}},
        {"seed": 4},
        {"stop": ["zz"]},
        {"extra_body": {"ignore_eos": False}},
        {"extra_body": {"ignore_eos": True, "stop_token_ids": [3]}},
        {"extra_body": {"ignore_eos": True, "include_stop_str_in_output": True}},
        {"prompt": "Keys!"},
        {"presence_penalty": 0.5},
        {"frequency_penalty": -0.5},
        {"logit_bias": {"5": 3}},
        {"extra_body": {"repetition_penalty": 1.1}},
    ],
)
async def test_a_changed_parameter_misses(
    cached: test_utils.TestServer, make_client: Callable[..., openai.AsyncOpenAI], change: dict[str, Any]
) -> None:
    client = make_client(cached)
    base: dict[str, Any] = {"prompt": "Keys", "max_tokens": 6, **GREEDY}
    await client.completions.create(**base)
    raw = await client.completions.with_raw_response.create(**{**base, **change})
    assert raw.headers[HEADER] == contract.RESPONSE_CACHE_MISS
    assert (await client.completions.with_raw_response.create(**base)).headers[HEADER] == "hit"


def test_every_sampling_field_and_model_detail_is_in_the_key() -> None:
    """Each field of the engine's SamplingParams, set to another valid value, gives another key; so do the
    model's revision, source, dtype and context length, and the tenant's key digest."""
    cfg = config.parse_config({"caching": CACHE_ON})
    state = state_mod.ServerState(config=cfg, metrics=metrics_mod.RuntimeMetrics(model_name="tiny", max_model_len=64))
    base = request_mod.SamplingParams(max_tokens=8, temperature=0.0)
    other_values = {
        "max_tokens": 9, "temperature": 0.0, "top_p": 0.9, "top_k": 3, "seed": 5, "stop": ("x",),
        "stop_token_ids": (2,), "ignore_eos": True, "include_stop_str_in_output": True, "detokenize": False,
        "presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.5, "logit_bias": ((3, 1.0),),
        "logprobs": 2, "prompt_logprobs": 2, "constraint": structured_spec.Constraint(kind="json_object"),
    }  # fmt: skip
    uncached = {"logprobs", "prompt_logprobs"}  # a stored answer keeps no logprobs: such requests bypass it
    assert set(other_values) == {f.name for f in dataclasses.fields(request_mod.SamplingParams)}
    key = response_cache.key_for(state, prompt_ids=[5, 6, 7], params=base, salt="")
    assert key is not None
    seen = {key}
    for name, value in other_values.items():
        if name == "temperature":
            continue  # the greedy value itself; covered below with a seed
        variant = dataclasses.replace(base, **{name: value})
        if name == "detokenize":
            variant = dataclasses.replace(base, detokenize=False)
        other = response_cache.key_for(state, prompt_ids=[5, 6, 7], params=variant, salt="")
        if name in uncached:
            assert other is None, name
            continue
        assert other is not None and other not in seen, name
        seen.add(other)
    assert (
        response_cache.key_for(state, prompt_ids=[5, 6, 7], params=dataclasses.replace(base, temperature=0), salt="")
        == key
    )
    warm = dataclasses.replace(base, temperature=0.7, seed=1)
    assert response_cache.key_for(state, prompt_ids=[5, 6, 7], params=warm, salt="") not in seen
    assert response_cache.key_for(state, prompt_ids=[5, 6, 7], params=dataclasses.replace(base, temperature=0.7),
                                  salt="") is None  # fmt: skip
    assert response_cache.key_for(state, prompt_ids=[5, 6, 7], params=base, salt="tenant") != key
    # Several choices or the echoed prompt are not stored either (a stored answer is one choice's text).
    assert response_cache.key_for(state, prompt_ids=[5, 6, 7], params=base, salt="", n=2) is None
    assert response_cache.key_for(state, prompt_ids=[5, 6, 7], params=base, salt="", echo=True) is None
    assert response_cache.key_for(state, prompt_ids=[5, 6], params=base, salt="") != key
    for model in ({"revision": "abc"}, {"source": "/models/other"}, {"dtype": "bfloat16"}, {"maxModelLen": 99},
                  {"servedModelName": "alias"}):  # fmt: skip
        changed = config.parse_config({"caching": CACHE_ON, "model": model})
        other_state = dataclasses.replace(state, config=changed)
        assert response_cache.key_for(other_state, prompt_ids=[5, 6, 7], params=base, salt="") != key, model


async def test_identical_requests_in_flight_are_computed_once(
    cached: test_utils.TestServer, make_client: Callable[..., openai.AsyncOpenAI]
) -> None:
    client = make_client(cached)
    kwargs: dict[str, Any] = {"prompt": "Together", "max_tokens": 40, **GREEDY}

    async def plain() -> tuple[str, str]:
        raw = await client.completions.with_raw_response.create(**kwargs)
        return raw.headers[HEADER], raw.parse().choices[0].text

    async def streamed() -> tuple[str, str]:
        raw = await client.completions.with_raw_response.create(**kwargs, stream=True)
        return raw.headers[HEADER], "".join([c.choices[0].text async for c in raw.parse() if c.choices])

    results = await asyncio.gather(plain(), streamed(), plain(), streamed(), plain(), plain())
    assert sorted(how for how, _ in results) == ["miss"] + ["shared"] * 5
    assert len({text for _, text in results}) == 1
    assert await _counts(cached) == {"length": 1, "hit": 5, "miss": 1}


async def test_an_aborted_leader_does_not_poison_its_followers(
    cached: test_utils.TestServer, make_client: Callable[..., openai.AsyncOpenAI], wait_until: Any
) -> None:
    state = cached.app[state_mod.state_key]
    client = make_client(cached)
    body = {"model": "tiny", "prompt": "Leader", "max_tokens": 150, "temperature": 0, "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{cached.port}/v1/completions"
        leader = await session.post(url, json={**body, "stream": True})
        await leader.content.readline()  # it is computing
        followers = [
            asyncio.create_task(client.completions.create(prompt="Leader", max_tokens=150, **GREEDY)) for _ in range(2)
        ]
        await wait_until("two followers to wait", lambda: state.num_inflight == 3)
        leader.close()  # the leader's client hangs up: its computation is aborted
        texts = [r.choices[0].text for r in await asyncio.gather(*followers)]
    assert texts[0] == texts[1]
    counts = await _counts(cached)
    assert counts["abort"] == 1 and counts["length"] == 1  # one follower recomputed, the other shared it
    assert counts["miss"] == 2 and counts["hit"] == 1
    again = await client.completions.with_raw_response.create(prompt="Leader", max_tokens=150, **GREEDY)
    assert again.headers[HEADER] == "hit" and again.parse().choices[0].text == texts[0]


async def test_failures_are_not_cached(
    cached: test_utils.TestServer, make_client: Callable[..., openai.AsyncOpenAI]
) -> None:
    engine = cached.app[state_mod.state_key].engine
    assert engine is not None
    real_execute = engine.core.runner.execute

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("simulated step failure")

    engine.core.runner.execute = broken  # type: ignore[method-assign]
    client = make_client(cached)
    with pytest.raises(openai.InternalServerError):
        await client.completions.create(prompt="Fails once", max_tokens=4, **GREEDY)
    engine.core.runner.execute = real_execute  # type: ignore[method-assign]
    raw = await client.completions.with_raw_response.create(prompt="Fails once", max_tokens=4, **GREEDY)
    assert raw.headers[HEADER] == "miss" and raw.parse().usage.completion_tokens == 4  # type: ignore[union-attr]


async def test_tenants_do_not_share_answers(
    make_server: MakeServer, small_config: Any, make_client: Callable[..., openai.AsyncOpenAI]
) -> None:
    qos = {"classes": [{"name": "default"}], "apiKeysFile": "/unused"}
    server = await make_server(
        small_config(caching=CACHE_ON, qos=qos), api_keys={"key-a": "default", "key-b": "default"}
    )
    a, b = make_client(server, api_key="key-a"), make_client(server, api_key="key-b")
    kwargs: dict[str, Any] = {"prompt": "Private", "max_tokens": 5, **GREEDY}
    assert (await a.completions.with_raw_response.create(**kwargs)).headers[HEADER] == "miss"
    assert (await b.completions.with_raw_response.create(**kwargs)).headers[HEADER] == "miss"
    assert (await a.completions.with_raw_response.create(**kwargs)).headers[HEADER] == "hit"


async def test_switched_off_by_config_and_by_the_command_line(
    make_server: MakeServer, small_config: Any, make_client: Callable[..., openai.AsyncOpenAI]
) -> None:
    server = await make_server(small_config(caching={"responseCache": {"enabled": False}}))
    client = make_client(server)
    for _ in range(2):
        raw = await client.completions.with_raw_response.create(prompt="Off", max_tokens=3, **GREEDY)
        assert HEADER not in raw.headers
    assert await _counts(server) == {"length": 2}
    assert config_from_args(build_parser().parse_args([])).caching.response_cache.enabled  # on by default
    off = config_from_args(build_parser().parse_args(["--no-response-cache"]))
    assert not off.caching.response_cache.enabled


async def _admin_put(server: test_utils.TestServer, body: Any) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.put(
            f"http://127.0.0.1:{server.port}{contract.PATH_ADMIN_CONFIG}",
            json=body,
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())


async def test_live_changes_empty_the_cache_only_when_outputs_could_change(
    make_server: MakeServer, small_config: Any, make_client: Callable[..., openai.AsyncOpenAI]
) -> None:
    qos = {"classes": [{"name": "default"}, {"name": "spare", "priority": 1, "sheddable": True}],
           "allowClassHeader": True}  # fmt: skip
    server = await make_server(small_config(caching=CACHE_ON, qos=qos))
    client = make_client(server)
    kwargs: dict[str, Any] = {"prompt": "Live", "max_tokens": 5, **GREEDY}

    async def how(**extra: Any) -> str | None:
        return (await client.completions.with_raw_response.create(**kwargs, **extra)).headers.get(HEADER)

    assert await how() == "miss"
    # Batch limits and shed classes decide who runs when, not what comes out: the cache stays.
    view = await _admin_put(server, {"batching": {"maxBatchSize": 4, "maxBatchTokens": 128},
                                     "qos": {"shedClasses": ["spare"]}})  # fmt: skip
    assert view["responseCache"]["entries"] == 1
    assert await how() == "hit"
    # A hit costs the engine nothing, so even a shed class gets it.
    assert await how(extra_headers={contract.HEADER_QOS_CLASS: "spare"}) == "hit"
    # The cache's own settings: rebuilt, empty.
    view = await _admin_put(server, {"caching": {"responseCache": {"maxEntries": 10, "ttlS": 60}}})
    assert view["config"]["caching"]["responseCache"]["maxEntries"] == 10 and view["responseCache"]["entries"] == 0
    assert await how() == "miss"
    assert await how() == "hit"
    view = await _admin_put(server, {"caching": {"responseCache": {"enabled": False}}})
    assert view["responseCache"] is None
    assert await how() is None
    await _admin_put(server, {"caching": {"responseCache": {"enabled": True}}})
    assert await how() == "miss"  # nothing survived the switch
