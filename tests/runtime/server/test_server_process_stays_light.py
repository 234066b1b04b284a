"""With the engine core in its own process, the server process never loads torch: it answers /health
within a second of starting and holds a fraction of the memory, while its child does the model work."""

from __future__ import annotations

import asyncio
import pathlib
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import aiohttp

from fleetlm_dev import testing


def _maps_torch(pid: int) -> bool:
    return "libtorch" in pathlib.Path(f"/proc/{pid}/maps").read_text()


def test_importing_the_server_imports_no_torch() -> None:
    code = "import sys, fleetlm_runtime.__main__; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


async def test_the_served_process_leaves_torch_to_its_engine_child(start_runtime: Callable[..., Any]) -> None:
    proc = start_runtime()
    await asyncio.to_thread(proc.wait_ready)
    async with aiohttp.ClientSession() as session:
        body = {"model": "tiny", "prompt": "hello there", "max_tokens": 4}
        async with session.post(proc.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
            assert (await resp.json())["usage"]["completion_tokens"] == 4
    server = proc.proc.pid
    children = testing.children_of(server)
    assert any(_maps_torch(child) for child in children), "the engine child should hold the model"
    assert not _maps_torch(server), "the server process loaded torch"
