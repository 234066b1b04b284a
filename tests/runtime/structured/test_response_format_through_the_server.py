"""`response_format` through the real server and the official `openai` client, with the engine in its own
process: many constrained and unconstrained chats at once on a KV pool they overflow (preemption) with the
prefix cache on, every constrained answer parsing and validating, streamed or not; the metrics count the
constrained requests and the compiles; bad schemas are 400s naming the field; the response cache keys on
the schema."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import jsonschema
import openai
import pytest
from prometheus_client import parser

from fleetlm_runtime import contract

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _client(server: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)


def _format(schema: dict[str, Any], i: int) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}


async def _metrics(server: Any) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{server.port}/metrics") as resp:
        text = await resp.text()
    values: dict[str, float] = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            label = sample.labels.get(contract.LABEL_STRUCTURED_KIND, "")
            values[sample.name + (f"[{label}]" if label else "")] = sample.value
    return values


async def test_concurrent_constrained_chats_validate_under_preemption(
    make_app_server: Callable[..., Any],
    server_config: Callable[..., Any],
    schemas: list[dict[str, Any]],
    max_tokens: int,
) -> None:
    from fleetlm_runtime.structured import formats

    server = await make_app_server(server_config())
    client = _client(server)
    prefix = "You answer in JSON. Describe the following thing in as much detail as the schema allows: "

    async def constrained(i: int) -> None:
        schema = schemas[i % len(schemas)]
        kwargs: dict[str, Any] = {
            "model": "tiny",
            "messages": [{"role": "user", "content": prefix + f"item number {i}"}],
            "max_tokens": max_tokens,
            "temperature": 1.0,
            "seed": i,
            "response_format": _format(schema, i),
        }
        if i % 3 == 0:  # streamed: the deltas concatenate to the same valid document
            text = ""
            reason = None
            async for chunk in await client.chat.completions.create(stream=True, **kwargs):
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    reason = chunk.choices[0].finish_reason or reason
        else:
            answer = await client.chat.completions.create(**kwargs)
            text, reason = answer.choices[0].message.content or "", answer.choices[0].finish_reason
        assert reason == "stop", (i, text)
        jsonschema.validate(json.loads(text), schema)

    async def plain(i: int) -> None:
        answer = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": prefix + f"plain {i}"}],
            max_tokens=40,
            temperature=1.0,
            seed=i,
        )
        assert answer.choices[0].finish_reason in ("stop", "length")

    try:
        n = len(schemas)
        await asyncio.gather(*(constrained(i) for i in range(n)), *(plain(i) for i in range(16)))
        values = await _metrics(server)
    finally:
        await client.close()
    assert values[f"{contract.STRUCTURED_REQUESTS}_total[json_schema]"] == n
    assert values[f"{contract.STRUCTURED_REQUESTS}_total[json_object]"] == 0
    # Each distinct schema compiled once in the engine process, however many requests used it.
    distinct = len({formats.canonical(s) for s in schemas})
    assert values[f"{contract.GRAMMAR_COMPILE_SECONDS}_count"] == distinct
    assert values[f"{contract.GRAMMAR_COMPILE_SECONDS}_sum"] > 0
    assert values[f"{contract.NUM_PREEMPTIONS}_total"] > 0, "the pool must overflow"
    assert values[f"{contract.PREFIX_CACHE_HITS}_total"] > 0


async def test_bad_formats_are_400s_naming_the_field(
    make_app_server: Callable[..., Any], server_config: Callable[..., Any]
) -> None:
    server = await make_app_server(server_config())
    client = _client(server)
    cases = [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
         "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/missing"}}},
         "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}, "response_format.json_schema.name"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "yaml"}, "response_format.type"),
        # Passes the server's check (Python's re takes it) but not the grammar library's (no lookbehind): the
        # engine's compile refuses it, for this request alone, and the answer is still a 400 naming the field.
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?<=a)b"}}},
         "response_format"),
    ]  # fmt: skip
    try:
        for response_format, field in cases:
            with pytest.raises(openai.BadRequestError) as caught:
                await client.chat.completions.create(
                    model="tiny",
                    messages=[{"role": "user", "content": "hi"}],
                    response_format=response_format,  # type: ignore[arg-type]
                    max_tokens=4,
                )
            error = caught.value.body
            assert isinstance(error, dict) and error["param"] == field, (response_format, error)
            assert error["type"] == "invalid_request_error" and error["message"]
    finally:
        await client.close()


async def test_the_response_cache_keys_on_the_schema(
    make_app_server: Callable[..., Any], server_config: Callable[..., Any]
) -> None:
    cache_on = {"responseCache": {"enabled": True, "maxEntries": 64, "ttlS": 300}}
    server = await make_app_server(server_config(caching=cache_on))
    client = _client(server)
    first = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"]}
    second = {"type": "object", "properties": {"b": {"enum": ["x", "y"]}}, "required": ["b"]}

    async def ask(response_format: dict[str, Any] | None) -> tuple[str, str]:
        extra: dict[str, Any] = {} if response_format is None else {"response_format": response_format}
        raw = await client.chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": "same"}], max_tokens=40, temperature=0, **extra
        )
        answer = raw.parse()
        return raw.headers[contract.HEADER_RESPONSE_CACHE], answer.choices[0].message.content or ""

    try:
        assert (await ask(_format(first, 1)))[0] == contract.RESPONSE_CACHE_MISS
        how, text = await ask(_format(first, 1))
        assert how == contract.RESPONSE_CACHE_HIT
        jsonschema.validate(json.loads(text), first)
        how, text = await ask(_format(second, 2))
        assert how == contract.RESPONSE_CACHE_MISS
        jsonschema.validate(json.loads(text), second)
        assert (await ask({"type": "json_object"}))[0] == contract.RESPONSE_CACHE_MISS
        assert (await ask(None))[0] == contract.RESPONSE_CACHE_MISS
        values = await _metrics(server)
        assert values[f"{contract.STRUCTURED_REQUESTS}_total[json_object]"] == 1
        assert values[f"{contract.STRUCTURED_REQUESTS}_total[json_schema]"] == 2  # the hit was not decoded
    finally:
        await client.close()


async def test_completions_take_response_format_too(
    make_app_server: Callable[..., Any], server_config: Callable[..., Any]
) -> None:
    """As vLLM's completions do: a client on the legacy API gets JSON that matches its schema, never a
    silently ignored field; a bad one is the same 400 naming the field."""
    server = await make_app_server(server_config())
    client = _client(server)
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "tags": {"type": "array", "maxItems": 3,
                                                                            "items": {"enum": ["a", "b"]}}},
        "required": ["name", "tags"],
    }  # fmt: skip
    try:
        for prompt in ("Describe a thing in JSON:", ["One thing:", "Another thing:"]):
            answer = await client.completions.create(
                model="tiny", prompt=prompt, max_tokens=120, temperature=0.8, seed=3,
                extra_body={"response_format": _format(schema, 0)},
            )  # fmt: skip
            assert len(answer.choices) == (1 if isinstance(prompt, str) else 2)
            for choice in answer.choices:
                assert choice.finish_reason == "stop", choice
                jsonschema.validate(json.loads(choice.text), schema)
        with pytest.raises(openai.BadRequestError) as caught:
            await client.completions.create(
                model="tiny", prompt="x", max_tokens=4, extra_body={"response_format": {"type": "yaml"}}
            )
        assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "response_format.type"
    finally:
        await client.close()
