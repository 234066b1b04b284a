"""Fixtures for the server tests: the real app on the built-in tiny model, in-process or as a process.

`make_server` builds `create_app()` with the real engine (torch on CPU, `builtin:tiny`) on aiohttp's test
server and waits until it is ready; `make_client` gives official `openai` clients pointed at it.
`start_runtime` runs the real `fleetlm-runtime` command on a free loopback port and stops it by the PID
it started, whatever the test did. Helpers are fixtures because test modules cannot import this file
(pytest runs with --import-mode=importlib).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import openai
import pytest
import yaml
from aiohttp import test_utils

from fleetlm_dev.testing import free_port
from fleetlm_runtime import config
from fleetlm_runtime.server import app as app_mod
from fleetlm_runtime.server import state as state_mod

ADMIN_TOKEN = "test-admin-token-0123456789"


def _small_config(**overrides: Any) -> config.RuntimeConfig:
    """A small, fast config: short context so no request can run for long on two shared cores.

    The response cache is off unless a test turns it on (`caching={"responseCache": {...}}`): the tests
    that send one greedy request twice to compare two paths through the engine must reach the engine twice.
    In-process servers run the engine core on a thread (`engineProcess: false`): it starts in a fraction of
    the time and lets tests look inside the core; tests pass `server={"engineProcess": True}` for the
    production layout, which every real `fleetlm-runtime` process below uses.
    """
    data: dict[str, Any] = {
        "model": {"source": "builtin:tiny", "dtype": "float32", "maxModelLen": 512},
        "batching": {"maxBatchSize": 8, "maxBatchTokens": 256, "maxQueueLen": 64},
        "server": {"drainGracePeriodS": 10, "engineProcess": False},
        "caching": {"responseCache": {"enabled": False}},
    }
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return config.parse_config(data)


MakeServer = Callable[..., Awaitable[test_utils.TestServer]]


@pytest.fixture
async def make_server(aiohttp_server: Any) -> AsyncIterator[MakeServer]:
    async def make(
        cfg: config.RuntimeConfig | None = None,
        *,
        admin_token: str | None = ADMIN_TOKEN,
        api_keys: dict[str, str] | None = None,
        engine_factory: state_mod.EngineFactory | None = None,
        wait_ready: bool = True,
    ) -> test_utils.TestServer:
        app = app_mod.create_app(cfg or _small_config(), engine_factory, admin_token=admin_token, api_keys=api_keys)
        server: test_utils.TestServer = await aiohttp_server(app)
        if wait_ready:
            await asyncio.wait_for(app[app_mod.engine_task_key], timeout=60)
        return server

    yield make


@pytest.fixture
def small_config() -> Callable[..., config.RuntimeConfig]:
    return _small_config


@pytest.fixture
async def server(make_server: MakeServer) -> test_utils.TestServer:
    return await make_server()


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., openai.AsyncOpenAI]]:
    clients: list[openai.AsyncOpenAI] = []

    def make(server: test_utils.TestServer, **kwargs: Any) -> openai.AsyncOpenAI:
        kwargs.setdefault("api_key", "unused")
        kwargs.setdefault("max_retries", 0)
        c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", **kwargs)
        clients.append(c)
        return c

    yield make
    for c in clients:
        await c.close()


@pytest.fixture
def client(server: test_utils.TestServer, make_client: Callable[..., openai.AsyncOpenAI]) -> openai.AsyncOpenAI:
    return make_client(server)


async def _wait_until(what: str, probe: Callable[[], bool], *, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
def wait_until() -> Callable[..., Awaitable[None]]:
    """`await wait_until("what", probe)`: poll a condition on the loop, failing with its name."""
    return _wait_until


# ------------------------------------------------------------------------------------------------
# The real command in a process


def runtime_command() -> list[str]:
    script = pathlib.Path(sys.executable).with_name("fleetlm-runtime")
    if script.exists():
        return [str(script)]
    found = shutil.which("fleetlm-runtime")
    return [found] if found else [sys.executable, "-m", "fleetlm_runtime"]


class RuntimeProcess:
    """`fleetlm-runtime` on a free port; stopped (SIGTERM, then SIGKILL) by the PID it started."""

    def __init__(
        self, directory: pathlib.Path, *, config_data: dict[str, Any], extra_args: list[str] | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config_path = directory / "runtime.yaml"
        config_path.write_text(yaml.safe_dump(config_data))
        token_path = directory / "admin-token"
        token_path.write_text(ADMIN_TOKEN + "\n")
        self.log_path = directory / "runtime.log"
        self._log = self.log_path.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.proc = subprocess.Popen(
            [
                *runtime_command(),
                "--config", str(config_path),
                "--port", str(self.port),
                "--admin-token-file", str(token_path),
                *(extra_args or []),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )  # fmt: skip

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"fleetlm-runtime exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(self.url + "/ready", timeout=1.0) as resp:
                if resp.status == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"fleetlm-runtime not ready after {timeout_s}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode


def _process_config(**overrides: Any) -> dict[str, Any]:
    """The config of a real runtime process: the engine core in its own process, as in production."""
    server = {"engineProcess": True, **overrides.pop("server", {})}
    return config.dump_config(_small_config(server=server, **overrides))


@pytest.fixture
def start_runtime(tmp_path: pathlib.Path) -> Iterator[Callable[..., RuntimeProcess]]:
    """`start_runtime(config_data, extra_args)`: a fresh process per call, all stopped at teardown."""
    started: list[RuntimeProcess] = []

    def start(config_data: dict[str, Any] | None = None, extra_args: list[str] | None = None) -> RuntimeProcess:
        directory = tmp_path / f"runtime-{len(started)}"
        directory.mkdir()
        proc = RuntimeProcess(directory, config_data=config_data or _process_config(), extra_args=extra_args)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def process_config() -> Callable[..., dict[str, Any]]:
    return _process_config
