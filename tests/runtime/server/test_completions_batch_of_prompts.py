"""OpenAI's batch form of completions: `prompt` as a list of strings or of token-id lists (what evaluation
harnesses such as lm-eval send with batch_size > 1). Each prompt's choices equal the same prompt sent alone,
at index i * n + j, with the usage summed; a bad prompt refuses the whole batch and leaves no KV behind."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest
from aiohttp import test_utils

from fleetlm_runtime.server import state as state_mod

GREEDY: dict[str, Any] = {"model": "tiny", "temperature": 0.0, "max_tokens": 5, "extra_body": {"ignore_eos": True}}


async def test_a_list_of_prompts_answers_each_as_if_sent_alone(client: openai.AsyncOpenAI) -> None:
    prompts = ["The first prompt", "A second, longer prompt than the first", "Third"]
    alone = [await client.completions.create(prompt=p, **GREEDY) for p in prompts]
    batch = await client.completions.create(prompt=prompts, **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == [a.choices[0].text for a in alone]
    assert batch.usage is not None
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone if a.usage)
    assert batch.usage.completion_tokens == 15


async def test_token_id_prompts_with_n_and_echo_logprobs(client: openai.AsyncOpenAI) -> None:
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    alone = [await client.completions.create(prompt=p, echo=True, logprobs=1, **GREEDY) for p in prompts]
    batch = await client.completions.create(prompt=prompts, echo=True, logprobs=1, **GREEDY)
    assert [c.text for c in batch.choices] == [a.choices[0].text for a in alone]
    for got, want in zip(batch.choices, alone, strict=True):
        assert got.logprobs is not None and want.choices[0].logprobs is not None
        assert got.logprobs.tokens == want.choices[0].logprobs.tokens
        assert len(got.logprobs.tokens or []) == len(prompts[got.index]) + 5  # the prompt echoed, then 5

    sampled = await client.completions.create(
        model="tiny", prompt=["one", "two"], n=3, max_tokens=3, temperature=1.0, seed=7
    )
    assert sorted(c.index for c in sampled.choices) == list(range(6))  # prompt i's choice j at i * 3 + j


async def test_a_bad_prompt_refuses_the_batch_and_frees_everything(
    server: test_utils.TestServer,
    client: openai.AsyncOpenAI,
    wait_until: Callable[..., Awaitable[None]],
) -> None:
    too_long = "word " * 5000
    with pytest.raises(openai.BadRequestError) as refused:
        await client.completions.create(prompt=["fine", too_long], **GREEDY)
    assert refused.value.body is not None and refused.value.body.get("param") == "prompt[1]"  # type: ignore[union-attr]
    assert refused.value.body.get("message", "").startswith("prompt[1]: ")  # type: ignore[union-attr]
    with pytest.raises(openai.BadRequestError) as streamed:
        await client.completions.create(prompt=["a", "b"], stream=True, **GREEDY)
    assert streamed.value.body.get("param") == "stream"  # type: ignore[union-attr]
    engine = server.app[state_mod.state_key].engine
    assert engine is not None
    await wait_until("the engine to hold no KV", lambda: engine.kv_usage == 0)
    ok = await client.completions.create(prompt=["still", "served"], **GREEDY)
    assert len(ok.choices) == 2
