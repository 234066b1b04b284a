"""The official `openai` client works unchanged: completions and chat, plain and streaming, usage, models.

Greedy requests make the output deterministic, so a stream must carry exactly the text and token count
of the same request answered in one piece.
"""

from __future__ import annotations

import asyncio
from typing import Any

import openai
from aiohttp import test_utils

GREEDY = {"temperature": 0.0}
EXACT = {"ignore_eos": True}  # vLLM's extension: run to max_tokens so counts are known


async def test_models_lists_the_served_model(client: openai.AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


async def test_completion_plain_and_streamed_agree(client: openai.AsyncOpenAI) -> None:
    plain = await client.completions.create(
        model="tiny", prompt="The quick brown fox", max_tokens=12, extra_body=EXACT, **GREEDY
    )
    assert plain.object == "text_completion"
    assert plain.choices[0].finish_reason == "length"
    assert plain.usage is not None and plain.usage.completion_tokens == 12
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + 12

    stream = await client.completions.create(
        model="tiny",
        prompt="The quick brown fox",
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=EXACT,
        **GREEDY,
    )
    texts: list[str] = []
    reasons: list[str | None] = []
    usage = None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []  # the usage chunk comes alone, after the last delta
            continue
        assert chunk.id.startswith("cmpl-")
        texts.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(texts) == plain.choices[0].text
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])
    assert usage is not None and usage.completion_tokens == 12
    assert usage.prompt_tokens == plain.usage.prompt_tokens


async def test_chat_plain_and_streamed_agree(client: openai.AsyncOpenAI) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello, how are you today?"},
    ]
    plain = await client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, extra_body=EXACT, **GREEDY
    )
    assert plain.object == "chat.completion"
    assert plain.choices[0].message.role == "assistant"
    assert plain.choices[0].finish_reason == "length"
    assert plain.usage is not None and plain.usage.completion_tokens == 10

    stream = await client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=EXACT,
        **GREEDY,
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


async def test_stream_without_usage_option_sends_no_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.completions.create(model="tiny", prompt="Hello", max_tokens=3, stream=True, **GREEDY)
    chunks = [chunk async for chunk in stream]
    assert chunks and all(c.usage is None for c in chunks)


async def test_stop_string_ends_the_text_before_it(client: openai.AsyncOpenAI) -> None:
    base = await client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=24, extra_body=EXACT, **GREEDY
    )
    text = base.choices[0].text
    # A stop string taken from the middle of the greedy text must cut it there.
    windows = (text[i : i + 3] for i in range(4, len(text) - 3))
    stop = next(w for w in windows if w.strip() and "\ufffd" not in w)
    cut = await client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=24, stop=[stop], extra_body=EXACT, **GREEDY
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]


async def test_token_id_prompts_are_accepted(client: openai.AsyncOpenAI) -> None:
    out = await client.completions.create(model="tiny", prompt=[10, 20, 30, 40], max_tokens=4, extra_body=EXACT)
    assert out.usage is not None and out.usage.prompt_tokens == 4 and out.usage.completion_tokens == 4


async def test_seeded_sampling_is_reproducible(client: openai.AsyncOpenAI) -> None:
    kwargs = {"model": "tiny", "prompt": "Hello world", "max_tokens": 12, "temperature": 1.0, "seed": 7}
    first, second = await asyncio.gather(
        client.completions.create(**kwargs, extra_body=EXACT), client.completions.create(**kwargs, extra_body=EXACT)
    )
    assert first.choices[0].text == second.choices[0].text


async def test_many_concurrent_streams_all_complete(client: openai.AsyncOpenAI) -> None:
    async def one(i: int) -> int:
        stream = await client.completions.create(
            model="tiny",
            prompt=f"Request number {i}",
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=EXACT,
        )
        usage = 0
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return usage

    assert await asyncio.gather(*(one(i) for i in range(16))) == [8] * 16


async def test_sync_client_in_a_thread(server: test_utils.TestServer) -> None:
    """The blocking client, as most scripts use it (in a thread: the server shares this event loop)."""

    def call() -> tuple[str | None, int | None, int]:
        with openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0) as sync:
            chat = sync.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, extra_body=EXACT
            )
            streamed = sum(
                1
                for chunk in sync.completions.create(model="tiny", prompt="Hi", max_tokens=5, stream=True)
                if chunk.choices and chunk.choices[0].text
            )
            return chat.choices[0].message.content, chat.usage.completion_tokens if chat.usage else None, streamed

    content, completion_tokens, streamed = await asyncio.to_thread(call)
    assert isinstance(content, str) and content  # the text of the five tokens, not a missing message
    assert completion_tokens == 5
    assert 1 <= streamed <= 5


async def test_stream_interval_sends_fewer_chunks_with_the_same_text(
    make_server: Any, small_config: Any, make_client: Any
) -> None:
    server = await make_server(small_config(server={"streamIntervalTokens": 4}))
    client = make_client(server)
    kwargs = {"model": "tiny", "prompt": "Hello there", "max_tokens": 13, "extra_body": EXACT, **GREEDY}
    plain = await client.completions.create(**kwargs)
    stream = await client.completions.create(**kwargs, stream=True)
    chunks = [c.choices[0].text async for c in stream if c.choices]
    assert "".join(chunks) == plain.choices[0].text
    # At most the first token at once, then one chunk per 4 tokens; fewer when the writer lags and merges
    # (on a machine loaded to 11 the whole answer came as one chunk), never more.
    assert 1 <= len(chunks) <= 1 + 3
