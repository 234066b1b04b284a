"""Tool calls on the real SmolLM2-135M-Instruct with the official client. SmolLM2's own chat template does
not render tools (the server refuses tools for it, by name), so the test sets a Hermes-style template on
the served tokenizer, as an operator would for a checkpoint without one. A named function and `required`
are decoded under the grammar: the calls' arguments validate against their schemas, whole and streamed."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
import openai
import pytest
from aiohttp import test_utils

from fleetlm_dev import checkpoints
from fleetlm_runtime import config
from fleetlm_runtime.server import app as app_mod
from fleetlm_runtime.server import state as state_mod

HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou are a helpful assistant with these functions:\n<tools>\n"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n"
    'Call one as <tool_call>{"name": <name>, "arguments": <args>}</tool_call><|im_end|>\n{% endif %}'
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
SEARCH = {
    "type": "object",
    "properties": {"query": {"type": "string", "maxLength": 60}},
    "required": ["query"],
    "additionalProperties": False,
}
TOOLS: Any = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "web_search", "description": "Search the web", "parameters": SEARCH}},
]
SCHEMAS = {"get_weather": WEATHER, "web_search": SEARCH}
ASK = [{"role": "user", "content": "What is the weather like in Paris today, in celsius?"}]


@pytest.fixture
async def served(aiohttp_server: Any, real_checkpoint: checkpoints.Checkpoint) -> Any:
    cfg = config.parse_config(
        {
            "model": {"source": str(real_checkpoint.single), "dtype": "float32", "maxModelLen": 1024},
            "batching": {"maxBatchSize": 8, "maxBatchTokens": 512, "maxQueueLen": 32},
            "server": {"engineProcess": False},
            "caching": {"responseCache": {"enabled": False}},
        }
    )
    app = app_mod.create_app(cfg, admin_token=None)
    server: test_utils.TestServer = await aiohttp_server(app)
    await asyncio.wait_for(app[app_mod.engine_task_key], timeout=120)
    tokenizer = app[state_mod.state_key].engine.tokenizer  # type: ignore[union-attr]
    template = tokenizer.chat_template
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)
    yield client, tokenizer
    tokenizer.chat_template = template
    await client.close()


def _check(calls: Any, names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


async def test_named_and_required_tool_calls_validate(served: Any) -> None:
    client, tokenizer = served
    model = "smollm2-135m-instruct"
    with pytest.raises(openai.BadRequestError) as caught:  # SmolLM2's own template has no tools
        await client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, max_tokens=8)
    assert caught.value.body["param"] == "tools"
    tokenizer.chat_template = HERMES_TEMPLATE
    named = {"type": "function", "function": {"name": "get_weather"}}
    answer = await client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=120, temperature=0
    )
    _check(answer.choices[0].message.tool_calls, {"get_weather"})
    assert "paris" in json.loads(answer.choices[0].message.tool_calls[0].function.arguments)["city"].lower()
    required = await client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200, temperature=0,
        parallel_tool_calls=False,
    )  # fmt: skip
    _check(required.choices[0].message.tool_calls, {"get_weather", "web_search"})
    async with client.chat.completions.stream(
        model=model, messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=120, temperature=0.7, seed=4
    ) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    _check(final.choices[0].message.tool_calls, {"get_weather"})
