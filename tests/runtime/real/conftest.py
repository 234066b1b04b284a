"""Fixtures for the tests on a real pretrained checkpoint (SmolLM2-135M-Instruct, converted once, cached).

`real_checkpoint` (tests/conftest.py: the dev tools' tests in tests/dev/real use it too) is the checkpoint.
`real_model` is the same checkpoint loaded by plain `transformers.from_pretrained` in fp32: the reference.
`real_server` is the real app (create_app, the real engine) on it, on aiohttp's test server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
import transformers
from aiohttp import test_utils

from fleetlm_dev import checkpoints
from fleetlm_runtime import config
from fleetlm_runtime.server import app as app_mod

MAX_MODEL_LEN = 1024


@pytest.fixture(scope="session")
def real_model(real_checkpoint: checkpoints.Checkpoint) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(
        real_checkpoint.single, dtype="float32", local_files_only=True
    ).eval()


@pytest.fixture(scope="session")
def real_tokenizer(real_checkpoint: checkpoints.Checkpoint) -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(real_checkpoint.single, local_files_only=True)


def real_config(source: str, **batching: Any) -> config.RuntimeConfig:
    return config.parse_config(
        {
            "model": {"source": source, "dtype": "float32", "maxModelLen": MAX_MODEL_LEN},
            "batching": {"maxBatchSize": 16, "maxBatchTokens": 512, "maxQueueLen": 64, **batching},
            "server": {"engineProcess": False},
            "caching": {"responseCache": {"enabled": False}},
        }
    )


@pytest.fixture
async def real_client(
    aiohttp_server: Any, real_checkpoint: checkpoints.Checkpoint
) -> AsyncIterator[openai.AsyncOpenAI]:
    app = app_mod.create_app(real_config(str(real_checkpoint.single)), admin_token=None)
    server: test_utils.TestServer = await aiohttp_server(app)
    await asyncio.wait_for(app[app_mod.engine_task_key], timeout=120)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)
    yield client
    await client.close()
