"""Fixtures for the router tests: real `fleetlm-runtime` processes on loopback, and the router app.

`replicas` starts two runtime processes on `builtin:tiny` once per session (the response cache is off,
so every request reaches an engine; tests read their counters as deltas and leave them idle).
`make_router` builds the real router app on aiohttp's test server, reading its replicas from a file the
test rewrites (add, remove). `start_replica` starts an extra process a test may kill. Everything is
stopped by the PID it started.
"""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp import test_utils

from fleetlm_dev import bench_router
from fleetlm_router import app as app_mod
from fleetlm_router import endpoints, scale, settings
from fleetlm_runtime import config as config_mod

QOS = {
    "classes": [
        {"name": "interactive", "priority": 0},
        {"name": "batch", "priority": 1, "sheddable": True},
    ],
    "defaultClass": "interactive",
    "allowClassHeader": True,
}


def runtime_config(**extra: Any) -> dict[str, Any]:
    return bench_router.runtime_config(max_model_len=512, extra={"qos": QOS, **extra})


@pytest.fixture
def qos_rules() -> dict[str, Any]:
    """The classes every replica (and router) here runs with: `batch` is sheddable, headers may lower."""
    return dict(QOS)


@pytest.fixture(scope="session")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[bench_router.Process]]:
    directory = tmp_path_factory.mktemp("replicas")
    started = [bench_router.start_runtime(directory, runtime_config(), name=f"replica-{i}") for i in range(2)]
    try:
        for proc in started:
            proc.wait_ready()
        yield started
    finally:
        for proc in started:
            proc.stop()


@pytest.fixture
def start_replica(tmp_path: pathlib.Path) -> Iterator[Callable[..., bench_router.Process]]:
    started: list[bench_router.Process] = []

    def start(**extra: Any) -> bench_router.Process:
        proc = bench_router.start_runtime(tmp_path, runtime_config(**extra), name=f"extra-{len(started)}")
        started.append(proc)
        proc.wait_ready()
        return proc

    yield start
    for proc in started:
        proc.stop()


class RouterHandle:
    def __init__(self, server: test_utils.TestServer, endpoints_file: pathlib.Path, scale_file: pathlib.Path) -> None:
        self.server = server
        self.url = f"http://127.0.0.1:{server.port}"
        self.endpoints_file = endpoints_file
        self.scale_file = scale_file
        self.state = server.app[app_mod.state_key]

    def set_replicas(self, urls: list[str]) -> None:
        bench_router.write_endpoints(self.endpoints_file, urls)

    async def wait_replicas(self, count: int) -> None:
        import asyncio

        for _ in range(200):
            if len(self.state.endpoints.replicas) == count:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"router did not see {count} replicas: {dict(self.state.endpoints.replicas)}")


MakeRouter = Callable[..., Awaitable[RouterHandle]]


@pytest.fixture
async def make_router(aiohttp_server: Any, tmp_path: pathlib.Path) -> AsyncIterator[MakeRouter]:
    count = 0

    async def make(
        urls: list[str], *, qos: dict[str, Any] | None = None, api_keys_file: pathlib.Path | None = None,
        **overrides: Any,
    ) -> RouterHandle:  # fmt: skip
        nonlocal count
        count += 1
        endpoints_file = tmp_path / f"endpoints-{count}.txt"
        scale_file = tmp_path / f"scale-{count}.jsonl"
        bench_router.write_endpoints(endpoints_file, urls)
        cfg = settings.RouterSettings(**{"hold_timeout_s": 2.0, "hold_comment_interval_s": 0.2, **overrides})
        qos_settings = config_mod.parse_config({"qos": qos or QOS}).qos
        classes = {c.name for c in qos_settings.classes}
        keys = config_mod.load_api_keys(api_keys_file, classes=classes) if api_keys_file else {}
        application = app_mod.create_app(
            cfg, source=endpoints.FileSource(endpoints_file, interval_s=0.05), qos_settings=qos_settings,
            scaler=scale.FileScaler(scale_file), api_keys=keys, api_keys_path=api_keys_file,
        )  # fmt: skip
        server = await aiohttp_server(application)
        handle = RouterHandle(server, endpoints_file, scale_file)
        await handle.wait_replicas(len(urls))
        return handle

    yield make
