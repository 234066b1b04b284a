"""After known traffic the metrics say exactly what happened: token counters equal the tokens streamed,
one latency observation per request, finish reasons and rejections by label, and config_info."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import test_utils
from prometheus_client import parser

from fleetlm_runtime import contract

N_REQUESTS = 6
MAX_TOKENS = 9


async def _families(server: test_utils.TestServer) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{server.port}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return {f.name: f for f in parser.text_string_to_metric_families(await resp.text())}


def _sum(families: dict[str, Any], family: str, sample: str | None = None, **labels: str) -> float:
    name = sample or family
    return sum(
        s.value
        for s in families[family].samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def test_counters_and_histograms_match_the_traffic(
    server: test_utils.TestServer, client: openai.AsyncOpenAI
) -> None:
    async def one(i: int) -> tuple[int, int, int]:
        stream = await client.completions.create(
            model="tiny",
            prompt=f"request {i} " * (i + 1),
            max_tokens=MAX_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks, usage = 0, None
        async for chunk in stream:
            if chunk.choices:
                chunks += 1
            if chunk.usage:
                usage = chunk.usage
        assert usage is not None
        return usage.prompt_tokens, usage.completion_tokens, chunks

    results = await asyncio.gather(*(one(i) for i in range(N_REQUESTS)))
    prompt_tokens = sum(r[0] for r in results)
    streamed_tokens = sum(r[1] for r in results)
    assert streamed_tokens == N_REQUESTS * MAX_TOKENS
    with_chat = await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert with_chat.usage is not None
    prompt_tokens += with_chat.usage.prompt_tokens
    streamed_tokens += with_chat.usage.completion_tokens
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model="tiny", prompt="x", top_p=5)

    f = await _families(server)
    m = {"model": "tiny", "qos_class": "default"}
    n = N_REQUESTS + 1
    assert _sum(f, contract.GENERATION_TOKENS, contract.sample_name(contract.GENERATION_TOKENS), **m) == streamed_tokens
    assert _sum(f, contract.PROMPT_TOKENS, contract.sample_name(contract.PROMPT_TOKENS), **m) == prompt_tokens
    success = contract.sample_name(contract.REQUEST_SUCCESS)
    assert _sum(f, contract.REQUEST_SUCCESS, success, finished_reason="length", **m) == n
    assert _sum(f, contract.REQUEST_SUCCESS, success, finished_reason="abort", **m) == 0
    rejected = contract.sample_name(contract.REQUESTS_REJECTED)
    assert _sum(f, contract.REQUESTS_REJECTED, rejected, reason=contract.REJECT_INVALID, **m) == 1

    for family in (
        contract.TIME_TO_FIRST_TOKEN_SECONDS,
        contract.E2E_REQUEST_LATENCY_SECONDS,
        contract.REQUEST_QUEUE_TIME_SECONDS,
        contract.REQUEST_PREFILL_TIME_SECONDS,
        contract.REQUEST_DECODE_TIME_SECONDS,
        contract.REQUEST_INFERENCE_TIME_SECONDS,
        contract.REQUEST_TIME_PER_OUTPUT_TOKEN_SECONDS,
    ):
        assert _sum(f, family, family + "_count", **m) == n, family
    # One inter-token gap per token after a request's first.
    assert _sum(f, contract.INTER_TOKEN_LATENCY_SECONDS, contract.INTER_TOKEN_LATENCY_SECONDS + "_count") == (
        streamed_tokens - n
    )
    assert _sum(f, contract.REQUEST_GENERATION_TOKENS, contract.REQUEST_GENERATION_TOKENS + "_sum") == streamed_tokens
    assert _sum(f, contract.REQUEST_PROMPT_TOKENS, contract.REQUEST_PROMPT_TOKENS + "_sum") == prompt_tokens
    # Every token went through some step: prefill tokens plus one decode token per token after the first.
    assert _sum(f, contract.ITERATION_TOKENS, contract.ITERATION_TOKENS + "_sum") == prompt_tokens + streamed_tokens - n
    assert _sum(f, contract.NUM_REQUESTS_RUNNING) == 0
    assert _sum(f, contract.NUM_REQUESTS_WAITING) == 0
    assert _sum(f, contract.KV_CACHE_USAGE_PERC) == 0
    assert _sum(f, contract.SERVER_READY) == 1
    (info,) = f[contract.CONFIG_INFO].samples
    assert info.labels["max_batch_size"] == "8" and info.labels["max_batch_tokens"] == "256"
    assert info.labels["qos_classes"] == "default"
    assert not set(f) & contract.GPU_METRICS  # CPU machine: absent, not zero


async def test_running_and_kv_gauges_rise_under_load(server: test_utils.TestServer, client: openai.AsyncOpenAI) -> None:
    stream = await client.completions.create(
        model="tiny", prompt="go", max_tokens=300, stream=True, extra_body={"ignore_eos": True}
    )
    seen = 0
    async for _chunk in stream:
        seen += 1
        if seen == 5:
            f = await _families(server)
            assert _sum(f, contract.NUM_REQUESTS_RUNNING, qos_class="default") == 1
            assert 0 < _sum(f, contract.KV_CACHE_USAGE_PERC) <= 1
            assert _sum(f, contract.BATCH_SIZE) == 1
            break
    await stream.close()
