"""AsyncEngine: streams, random arrivals on the event loop, abort, drain, live limits, stats."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable

import pytest

from fleetlm_dev.testing import collect, greedy
from fleetlm_runtime.engine import async_engine, core, outputs
from fleetlm_runtime.engine import config as config_mod
from fleetlm_runtime.engine import request as request_mod
from fleetlm_runtime.models import loader


@pytest.fixture
async def engine(tiny: loader.LoadedModel) -> AsyncIterator[async_engine.AsyncEngine]:
    stats: list[outputs.EngineStats] = []
    eng = async_engine.AsyncEngine(
        core.EngineCore(config_mod.EngineConfig(max_batch_size=16, max_batch_tokens=64), loaded=tiny),
        stats_callback=stats.append,
    )
    eng.stats = stats  # type: ignore[attr-defined]
    eng.start()
    yield eng
    await eng.shutdown()


async def test_fifty_requests_at_random_times_equal_generate(
    engine: async_engine.AsyncEngine,
    reference_model: object,
    generate_greedy: Callable[..., list[int]],
    random_prompts: Callable[..., list[list[int]]],
) -> None:
    rng = random.Random(1)
    prompts = random_prompts(50, vocab_size=engine.core.loaded.vocab_size, seed=21, max_len=160)
    max_tokens = [rng.randint(1, 40) for _ in prompts]
    # Half arrive at once (a burst that fills the batch), half trickle in while it runs.
    delays = [0.0 if i % 2 else rng.uniform(0, 0.2) for i in range(len(prompts))]

    async def client(i: int) -> list[int]:
        await asyncio.sleep(delays[i])
        tokens, _, _ = await collect(engine.generate(prompts[i], greedy(max_tokens[i])))
        return tokens

    results = await asyncio.gather(*(client(i) for i in range(len(prompts))))
    for i, tokens in enumerate(results):
        assert tokens == generate_greedy(reference_model, prompts[i], max_tokens[i]), f"request {i}"
    assert max(s.batch_size for s in engine.stats) >= 8  # type: ignore[attr-defined]
    assert engine.core.kv_usage == 0.0


async def test_text_streams_and_matches_a_full_decode(engine: async_engine.AsyncEngine) -> None:
    tokens, text, last = await collect(engine.generate("Hello world! The scheduler", greedy(30)))
    assert text == engine.decode(tokens)
    assert last.num_output_tokens == len(tokens) and last.num_prompt_tokens == len(
        engine.encode("Hello world! The scheduler")
    )


async def test_abort_mid_stream_ends_it_and_frees_kv(engine: async_engine.AsyncEngine) -> None:
    streams = [engine.submit([5 + i] * 40, greedy(500, ignore_eos=True)) for i in range(6)]
    for stream in streams:
        await anext(stream)  # every request is running and holds KV
    assert engine.core.kv_usage > 0
    for stream in streams:
        stream.abort()
    for stream in streams:
        _, _, last = await collect(stream)
        assert last.finish_reason is request_mod.FinishReason.ABORT
    assert engine.core.kv_usage == 0.0
    assert engine.core.runner.num_requests == 0 and engine.core.scheduler.kv.num_requests == 0


async def test_a_cancelled_consumer_aborts_its_request(engine: async_engine.AsyncEngine) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate([9] * 30, greedy(1000, ignore_eos=True), req_id="gone"):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):  # the abort reaches the worker before its next step
        if engine.num_unfinished == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.num_unfinished == 0 and engine.core.kv_usage == 0.0
    assert "gone" not in engine.core.scheduler.requests


async def test_invalid_requests_fail_at_submit_with_the_parameter_named(engine: async_engine.AsyncEngine) -> None:
    context = engine.core.max_model_len
    with pytest.raises(request_mod.InvalidParameterError) as info:
        engine.submit([1] * 10, greedy(context))
    assert info.value.param == "max_tokens" and str(context) in info.value.message
    with pytest.raises(request_mod.InvalidParameterError) as info:
        engine.submit([1] * context, greedy(1))
    assert info.value.param == "prompt"
    with pytest.raises(request_mod.InvalidParameterError) as info:
        engine.submit([], greedy(1))
    assert info.value.param == "prompt"
    assert engine.num_unfinished == 0


async def test_limits_change_live_between_steps(engine: async_engine.AsyncEngine) -> None:
    engine.update_limits(max_batch_size=2, max_batch_tokens=32)
    results = await asyncio.gather(*(collect(engine.generate([3 + i] * 8, greedy(6))) for i in range(6)))
    assert all(len(tokens) >= 1 for tokens, _, _ in results)
    stats = engine.stats  # type: ignore[attr-defined]
    assert stats[-1].max_batch_size == 2 and stats[-1].max_batch_tokens == 32
    assert max(s.batch_size for s in stats) <= 2
    with pytest.raises(request_mod.InvalidParameterError) as info:
        engine.update_limits(max_batch_tokens=1)
    assert info.value.param == "max_batch_tokens"


async def test_stats_report_batch_kv_and_request_events(engine: async_engine.AsyncEngine) -> None:
    await collect(engine.generate([4] * 20, greedy(5), qos_class="gold"))
    stats: list[outputs.EngineStats] = engine.stats  # type: ignore[attr-defined]
    first = stats[0]
    assert first.num_prefill_tokens == 20 and first.num_tokens == 20 and first.batch_size == 1
    assert first.running_by_class == {"gold": 1} and 0 < first.kv_usage <= 1
    assert first.kv_capacity_tokens == engine.core.scheduler.kv.capacity_tokens
    assert 0 < first.model_duration_s <= first.step_duration_s
    kinds = [e.kind for s in stats for e in s.events]
    assert kinds == [outputs.EventKind.SCHEDULED, outputs.EventKind.FIRST_TOKEN, outputs.EventKind.FINISHED]
    finished = stats[-1].events[-1]
    assert finished.qos_class == "gold" and finished.num_output_tokens == 5
    assert finished.first_token_time_s is not None and finished.first_token_time_s >= finished.arrival_time_s
    assert len([x for s in stats for x in s.inter_token_latencies_s]) == 4
    assert stats[-1].kv_usage == 0.0 and stats[-1].num_running == 0


async def test_drain_waits_for_in_flight_requests_and_refuses_new_ones(engine: async_engine.AsyncEngine) -> None:
    stream = engine.submit([7] * 10, greedy(20, ignore_eos=True))
    drained = asyncio.create_task(engine.drain(timeout_s=30))
    await asyncio.sleep(0)
    with pytest.raises(async_engine.EngineDrainingError):
        engine.submit([7] * 10, greedy(2))
    tokens, _, last = await collect(stream)
    assert len(tokens) == 20 and last.finish_reason is request_mod.FinishReason.LENGTH
    assert await drained is True


async def test_shutdown_aborts_what_is_left(tiny: loader.LoadedModel) -> None:
    eng = await async_engine.AsyncEngine.create(config_mod.EngineConfig(max_batch_size=4, max_batch_tokens=64))
    stream = eng.submit([7] * 10, greedy(1000, ignore_eos=True))
    await anext(stream)
    await eng.shutdown()
    _, _, last = await collect(stream)
    assert last.finish_reason is request_mod.FinishReason.ABORT
    assert not eng.is_running


async def test_chat_template_and_tokenizer_helpers(engine: async_engine.AsyncEngine) -> None:
    messages = [{"role": "user", "content": "hi there"}]
    rendered = engine.render_chat(messages)
    assert rendered == "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
    ids = engine.encode_chat(messages)
    assert ids[0] == engine.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert engine.decode(ids, skip_special_tokens=False) == rendered
    _, _, last = await collect(engine.generate(ids, greedy(3)))
    assert last.num_prompt_tokens == len(ids)
