"""Fixtures for the tests of `fleetlm-dev bench serve`: real `fleetlm-runtime` processes on loopback,
started with the dev package's own helper (`bench_router.start_runtime`) and stopped by their PIDs."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from fleetlm_dev import bench_router

# Clients may only lower their class by header: the default is the top class, so both can be chosen.
QOS = {
    "classes": [{"name": "interactive", "priority": 0}, {"name": "batch", "priority": 1}],
    "defaultClass": "interactive",
    "allowClassHeader": True,
}


def _started(directory: pathlib.Path, name: str, **extra: object) -> Iterator[bench_router.Process]:
    config = bench_router.runtime_config(max_model_len=512, extra={"qos": QOS, **extra})
    proc = bench_router.start_runtime(directory, config, name=name)
    try:
        proc.wait_ready(timeout_s=120)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def runtime_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[bench_router.Process]:
    """One real runtime process for a whole module, response cache off (starting one costs seconds)."""
    yield from _started(tmp_path_factory.mktemp("runtime"), "runtime")


@pytest.fixture
def cached_runtime_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[bench_router.Process]:
    """A real runtime process with the response cache on: exact repeats are answered from it."""
    yield from _started(tmp_path_factory.mktemp("cached"), "cached", caching={"responseCache": {"enabled": True}})
