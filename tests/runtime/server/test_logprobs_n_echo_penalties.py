"""Logprobs, n, echo, penalties and logit_bias through the official `openai` client against the real
server (engine on a thread, and once in its own process, which carries logprobs across the pipe)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import openai
import pytest
import torch
import transformers
from aiohttp import test_utils
from prometheus_client import parser

from fleetlm_runtime import contract

GREEDY: dict[str, Any] = {"model": "tiny", "temperature": 0.0, "extra_body": {"ignore_eos": True}}
MESSAGES = [{"role": "user", "content": "Tell me about logprobs."}]
PROMPT_IDS = [(7 * i + 3) % 800 + 1 for i in range(40)]  # two full KV blocks of 16 and a partial one


def _hf_log_softmax(model: transformers.PreTrainedModel, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


async def test_chat_logprobs_shape_and_order_plain_and_streamed(client: openai.AsyncOpenAI) -> None:
    plain = await client.chat.completions.create(
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=6,
        logprobs=True,
        top_logprobs=3,
        **GREEDY,
    )
    content = plain.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 6
    for item in content:
        assert len(item.top_logprobs) == 3
        values = [t.logprob for t in item.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0.0 for v in values)
        assert item.top_logprobs[0].token == item.token  # greedy picks the most likely token
        assert item.logprob == pytest.approx(values[0], abs=1e-6)
        assert item.bytes == list(item.token.encode())
    stream = await client.chat.completions.create(
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=6,
        logprobs=True,
        top_logprobs=3,
        stream=True,
        **GREEDY,
    )
    streamed = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content or []
    assert [(i.token, round(i.logprob, 5)) for i in streamed] == [(i.token, round(i.logprob, 5)) for i in content]


async def test_completion_logprobs_equal_hf_and_stream_the_same(
    client: openai.AsyncOpenAI, reference_model: transformers.PreTrainedModel, tokenizer: Any
) -> None:
    plain = await client.completions.create(prompt=PROMPT_IDS, max_tokens=5, logprobs=2, **GREEDY)
    lp = plain.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5  # type: ignore[arg-type]
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]  # type: ignore[index]
    generated = tokenizer(plain.choices[0].text, add_special_tokens=False)["input_ids"]
    reference = _hf_log_softmax(reference_model, PROMPT_IDS + generated)
    for step, value in enumerate(lp.token_logprobs):  # type: ignore[arg-type]
        assert value == pytest.approx(float(reference[len(PROMPT_IDS) - 1 + step].max()), abs=1e-4)
        assert 1 <= len(lp.top_logprobs[step]) <= 2  # type: ignore[index]
    stream = await client.completions.create(prompt=PROMPT_IDS, max_tokens=5, logprobs=2, stream=True, **GREEDY)
    tokens: list[str] = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs is not None:
            tokens += chunk.choices[0].logprobs.tokens or []
    assert tokens == lp.tokens


async def test_echo_returns_the_prompt_and_its_logprobs(
    client: openai.AsyncOpenAI, reference_model: transformers.PreTrainedModel, tokenizer: Any
) -> None:
    reply = await client.completions.create(prompt=PROMPT_IDS, max_tokens=3, echo=True, logprobs=1, **GREEDY)
    choice = reply.choices[0]
    prompt_text = tokenizer.decode(PROMPT_IDS)
    assert choice.text.startswith(prompt_text) and len(choice.text) > len(prompt_text)
    lp = choice.logprobs
    assert lp is not None and len(lp.token_logprobs) == len(PROMPT_IDS) + 3  # type: ignore[arg-type]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # type: ignore[index]
    reference = _hf_log_softmax(reference_model, PROMPT_IDS)
    for position in range(1, len(PROMPT_IDS)):
        expected = float(reference[position - 1, PROMPT_IDS[position]])
        assert lp.token_logprobs[position] == pytest.approx(expected, abs=1e-4)  # type: ignore[index]
    plain_echo = await client.completions.create(prompt=PROMPT_IDS, max_tokens=3, echo=True, **GREEDY)
    assert plain_echo.choices[0].text == choice.text and plain_echo.choices[0].logprobs is None


def _metric(text: str, family: str) -> float:
    return sum(
        s.value
        for fam in parser.text_string_to_metric_families(text)
        if fam.name == family
        for s in fam.samples
        if not s.name.endswith("_created")
    )


async def test_n_seeded_is_reproducible_distinct_and_shares_the_prompt_blocks(
    server: test_utils.TestServer, make_client: Callable[..., openai.AsyncOpenAI]
) -> None:
    client = make_client(server)
    metrics = f"http://127.0.0.1:{server.port}/metrics"

    async def hits() -> float:
        async with aiohttp.ClientSession() as session, session.get(metrics) as resp:
            return _metric(await resp.text(), contract.PREFIX_CACHE_HITS)

    before = await hits()
    body: dict[str, Any] = {
        "model": "tiny",
        "prompt": PROMPT_IDS,
        "max_tokens": 12,
        "temperature": 1.0,
        "seed": 7,
        "extra_body": {"ignore_eos": True},
    }
    first = await client.completions.create(n=4, **body)
    after = await hits()
    # One prefill of the two full blocks: the other three sequences hit them (the partial block is theirs).
    assert after - before == 3 * 32
    second = await client.completions.create(n=4, **body)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len({c.text for c in first.choices}) > 1
    assert first.usage is not None and first.usage.completion_tokens == 4 * 12
    assert first.usage.prompt_tokens == len(PROMPT_IDS)  # the prompt counts once
    # Choice i is the single request with seed + i.
    single = await client.completions.create(**{**body, "seed": 9})
    assert single.choices[0].text == first.choices[2].text

    stream = await client.completions.create(n=4, stream=True, **body)
    texts = ["", "", "", ""]
    finished = set()
    async for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason is not None:
                finished.add(c.index)
    assert texts == [c.text for c in first.choices] and finished == {0, 1, 2, 3}


async def test_logit_bias_and_penalties_reach_the_engine(client: openai.AsyncOpenAI, tokenizer: Any) -> None:
    forced = await client.completions.create(prompt="Hi", max_tokens=5, logit_bias={"42": 100}, **GREEDY)
    assert forced.choices[0].text == tokenizer.decode([42] * 5)
    repeats = [5] * 8
    plain = await client.completions.create(prompt=repeats, max_tokens=20, **GREEDY)
    penalised = await client.completions.create(prompt=repeats, max_tokens=20, frequency_penalty=2.0, **GREEDY)
    assert penalised.choices[0].text != plain.choices[0].text


async def test_logprobs_and_n_in_the_engine_process(
    make_server: Any, small_config: Callable[..., Any], make_client: Callable[..., openai.AsyncOpenAI]
) -> None:
    server = await make_server(small_config(server={"engineProcess": True}))
    client = make_client(server)
    reply = await client.completions.create(prompt=PROMPT_IDS, max_tokens=4, logprobs=3, echo=True, n=2, **GREEDY)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].text == reply.choices[1].text  # greedy: both choices agree
    for choice in reply.choices:
        lp = choice.logprobs
        assert lp is not None and len(lp.token_logprobs) == len(PROMPT_IDS) + 4  # type: ignore[arg-type]
        assert all(len(top) >= 1 for top in lp.top_logprobs[1:])  # type: ignore[index, union-attr]
