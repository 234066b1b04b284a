"""The engine core in its own process: same tokens as on a thread, load errors that say what is wrong, a
killed core fails every stream (never a hang), shutdown stops the child, and a core whose server is gone
exits by itself (no orphan holding the GPU)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable

import pytest

from fleetlm_dev import testing
from fleetlm_dev.testing import collect, greedy
from fleetlm_runtime.engine import async_engine, core_process, outputs
from fleetlm_runtime.engine import config as config_mod
from fleetlm_runtime.engine import request as request_mod
from fleetlm_runtime.models import loader

CONFIG = config_mod.EngineConfig(max_batch_size=8, max_batch_tokens=64, num_threads=1)


def _wait_gone(pid: int, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not testing.is_running(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
async def process_engine() -> AsyncIterator[async_engine.AsyncEngine]:
    stats: list[outputs.EngineStats] = []
    eng = await async_engine.AsyncEngine.create(CONFIG, stats_callback=stats.append, executor_kind="process")
    eng.stats = stats  # type: ignore[attr-defined]
    yield eng
    await eng.shutdown()


async def test_same_tokens_text_and_stats_as_the_thread_core(
    process_engine: async_engine.AsyncEngine,
    tiny: loader.LoadedModel,
    random_prompts: Callable[..., list[list[int]]],
) -> None:
    assert process_engine.executor_kind == "process"
    with pytest.raises(RuntimeError, match="another process"):
        _ = process_engine.core
    assert process_engine.max_model_len == tiny.max_model_len
    assert process_engine.info.vocab_size == tiny.vocab_size
    # The tokenizer came from the core process: it tokenizes exactly as the model's own.
    assert process_engine.encode("Python is a language") == list(tiny.tokenizer("Python is a language")["input_ids"])

    thread_engine = await async_engine.AsyncEngine.create(CONFIG, executor_kind="thread")
    try:
        prompts = random_prompts(12, vocab_size=tiny.vocab_size, seed=5, max_len=90)
        runs = []
        for eng in (process_engine, thread_engine):
            runs.append(await asyncio.gather(*(collect(eng.generate(p, greedy(17))) for p in prompts)))
    finally:
        await thread_engine.shutdown()
    for (p_tokens, p_text, p_last), (t_tokens, t_text, t_last) in zip(*runs, strict=True):
        assert p_tokens == t_tokens and p_text == t_text
        assert (p_last.finish_reason, p_last.num_output_tokens) == (t_last.finish_reason, t_last.num_output_tokens)
    stats = process_engine.stats  # type: ignore[attr-defined]
    assert sum(s.num_decode_tokens for s in stats) > 0 and stats[-1].num_running == 0
    finished = [e for s in stats for e in s.events if e.kind is outputs.EventKind.FINISHED]
    assert len(finished) == len(prompts)
    assert process_engine.kv_usage == 0.0


async def test_bad_requests_are_refused_before_they_reach_the_process(
    process_engine: async_engine.AsyncEngine,
) -> None:
    with pytest.raises(request_mod.InvalidParameterError) as err:
        process_engine.submit([1] * 10, greedy(process_engine.max_model_len))
    assert err.value.param == "max_tokens"
    with pytest.raises(request_mod.InvalidParameterError) as err:
        process_engine.submit([process_engine.info.vocab_size + 5], greedy(2))
    assert err.value.param == "prompt"
    _, _, last = await collect(process_engine.generate([5, 6, 7], greedy(3)))  # and it still serves
    assert last.finish_reason is request_mod.FinishReason.LENGTH


async def test_live_limits_reach_the_core_process(process_engine: async_engine.AsyncEngine) -> None:
    process_engine.update_limits(max_batch_size=2, max_batch_tokens=16)
    await collect(process_engine.generate([5, 6, 7], greedy(3)))
    stats = process_engine.stats  # type: ignore[attr-defined]
    assert (stats[-1].max_batch_size, stats[-1].max_batch_tokens) == (2, 16)
    assert process_engine.limits == (2, 16)


async def test_a_load_error_reaches_the_server_as_raised() -> None:
    with pytest.raises(loader.ModelLoadError, match="max_model_len must be in"):
        await async_engine.AsyncEngine.create(
            config_mod.EngineConfig(max_model_len=10**7, max_batch_size=1, max_batch_tokens=8), executor_kind="process"
        )
    with pytest.raises(loader.ModelLoadError, match="not a directory"):
        await async_engine.AsyncEngine.create(
            config_mod.EngineConfig(model="/nonexistent/model"), executor_kind="process"
        )


async def test_a_killed_core_fails_every_stream_and_new_requests(process_engine: async_engine.AsyncEngine) -> None:
    executor = process_engine._executor
    assert isinstance(executor, core_process.ProcessExecutor) and executor.pid is not None
    streams = [process_engine.submit([7] * 8, greedy(400, ignore_eos=True)) for _ in range(3)]
    await anext(streams[0])
    os.kill(executor.pid, signal.SIGKILL)  # what the OOM killer does
    for stream in streams:
        _, _, last = await asyncio.wait_for(collect(stream), timeout=10)
        assert last.finish_reason is request_mod.FinishReason.ERROR and "engine" in (last.error or "")
    assert not process_engine.is_running
    with pytest.raises(async_engine.EngineDeadError):
        process_engine.submit([1, 2], greedy(2))
    # The server learns of the death (to exit), and the dead child is reaped, not left a zombie.
    error = await asyncio.wait_for(process_engine.wait_dead(), timeout=5)
    assert isinstance(error, core_process.EngineProcessError) and "code -9" in str(error)
    assert executor._process.exitcode == -signal.SIGKILL
    assert not await asyncio.to_thread(os.path.exists, f"/proc/{executor.pid}"), "the dead child was not reaped"


async def test_shutdown_aborts_what_is_left_and_stops_the_process() -> None:
    eng = await async_engine.AsyncEngine.create(CONFIG, executor_kind="process")
    executor = eng._executor
    assert isinstance(executor, core_process.ProcessExecutor) and executor.pid is not None
    stream = eng.submit([7] * 10, greedy(1000, ignore_eos=True))
    await anext(stream)
    await eng.shutdown()
    _, _, last = await collect(stream)
    assert last.finish_reason is request_mod.FinishReason.ABORT
    assert not eng.is_running
    assert _wait_gone(executor.pid, timeout_s=5)


def test_the_core_process_dies_with_its_server_at_once(tmp_path: object) -> None:
    script = textwrap.dedent(
        """
        import asyncio, sys, time
        from fleetlm_runtime.engine import async_engine
        from fleetlm_runtime.engine import config as config_mod

        async def main():
            eng = await async_engine.AsyncEngine.create(
                config_mod.EngineConfig(max_batch_size=2, max_batch_tokens=16, num_threads=1),
                executor_kind="process",
            )
            print(eng._executor.pid, flush=True)
            await asyncio.sleep(600)

        asyncio.run(main())
        """
    )
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        child_pid = int(server.stdout.readline())
        assert testing.is_running(child_pid)
        server.send_signal(signal.SIGKILL)  # no cleanup at all: the child must notice on its own
        server.wait(timeout=10)
        killed = time.monotonic()
        # The kernel's parent-death signal kills it at once (a pipe read would notice only later).
        assert _wait_gone(child_pid, timeout_s=5), "the engine process outlived its server"
        assert time.monotonic() - killed < 0.5, (
            f"the engine process outlived its server by {time.monotonic() - killed:.2f}s"
        )
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        if server.stdout is not None:
            server.stdout.close()  # an unclosed pipe is a ResourceWarning, an error in this suite
