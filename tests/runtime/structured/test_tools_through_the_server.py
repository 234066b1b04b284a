"""Tool calling end to end with the official `openai` client on the real server (tiny model, random
weights). SmolLM2's and the tiny model's own templates do not render tools, so these tests set a
Hermes-style Jinja template (tools in a system block, calls as `<tool_call>` JSON, results as
`<tool_response>`) on the served tokenizer: the server renders through whatever template the checkpoint
has. A random model never chooses a tool by itself, so the calls here come from the grammar: `required`,
a named function, and `auto` with a response_format that makes the answer the Llama 3 JSON form, which
the auto parser turns into a call; the streamed ones are reassembled by the client's own stream helpers."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jsonschema
import openai
import pytest

from fleetlm_runtime import contract
from fleetlm_runtime.server import state as state_mod

HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call these functions:\n<tools>\n"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n"
    'Call one as <tool_call>{"name": <name>, "arguments": <args>}</tool_call><|im_end|>\n{% endif %}'
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant"
    "{%- for call in message.tool_calls %}\n<tool_call>\n"
    '{{ {"name": call.function.name, "arguments": call.function.arguments} | tojson }}\n</tool_call>'
    "{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CITY = {"type": "string", "maxLength": 10}
WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": CITY, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMS = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER_PARAMS},
    },
    {"type": "function", "function": {"name": "get_time", "description": "Time now", "parameters": TIME_PARAMS}},
]
SCHEMAS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
async def client(make_app_server: Callable[..., Any], server_config: Callable[..., Any]) -> Any:
    cfg = server_config(
        model={"maxModelLen": 2048},
        batching={"maxKvTokens": 16384},
        server={"engineProcess": False},
        caching={"responseCache": {"enabled": True, "maxEntries": 64, "ttlS": 300}},
    )
    server = await make_app_server(cfg)
    engine = server.app[state_mod.state_key].engine
    c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)
    c.engine_tokenizer = engine.tokenizer  # type: ignore[attr-defined]
    template = engine.tokenizer.chat_template
    yield c
    engine.tokenizer.chat_template = template  # the tokenizer may be shared with later tests
    await c.close()


def _hermes(client: Any) -> None:
    client.engine_tokenizer.chat_template = HERMES_TEMPLATE


def _check_calls(calls: list[Any], names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


async def _streamed(client: openai.AsyncOpenAI, **kwargs: Any) -> Any:
    """A streamed chat reassembled by the client's own helper (openai's ChatCompletionStreamState)."""
    async with client.chat.completions.stream(model="tiny", max_tokens=300, temperature=1.0, seed=3, **kwargs) as s:
        async for _ in s:
            pass
        return await s.get_final_completion()


async def test_a_template_without_tools_refuses_them(client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, max_tokens=8)
    assert caught.value.body["param"] == "tools"  # type: ignore[index]


async def test_named_and_required_calls_validate_whole_and_streamed(client: Any) -> None:
    _hermes(client)
    named = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(3):
        answer = await client.chat.completions.create(
            model="tiny", messages=USER, tools=TOOLS, tool_choice=named, max_tokens=300, temperature=1.0, seed=seed
        )
        choice = answer.choices[0]
        # A named function is the answer asked for: OpenAI (and vLLM) end it with `stop`, not `tool_calls`.
        assert choice.finish_reason == "stop" and choice.message.content is None
        _check_calls(choice.message.tool_calls, {"get_weather"})
        assert len(choice.message.tool_calls) == 1
        final = await _streamed(client, messages=USER, tools=TOOLS, tool_choice=named)
        assert final.choices[0].finish_reason == "stop"
        _check_calls(final.choices[0].message.tool_calls, {"get_weather"})
    for parallel in (False, None):
        extra: dict[str, Any] = {} if parallel is None else {"parallel_tool_calls": parallel}
        answer = await client.chat.completions.create(
            model="tiny", messages=USER, tools=TOOLS, tool_choice="required", max_tokens=600, temperature=1.0,
            seed=11, **extra,
        )  # fmt: skip
        _check_calls(answer.choices[0].message.tool_calls, {"get_weather", "get_time"})
        if parallel is False:
            assert len(answer.choices[0].message.tool_calls) == 1
        final = await _streamed(client, messages=USER, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
        assert final.choices[0].finish_reason == "tool_calls"
        _check_calls(final.choices[0].message.tool_calls, {"get_weather", "get_time"})


async def test_auto_parses_the_llama_json_form_and_none_leaves_tools_out(client: Any) -> None:
    _hermes(client)
    # The answer is forced into the Llama 3 JSON form; `auto` must recognise it as a call.
    llama_form = {
        "type": "object",
        "properties": {"name": {"const": "get_weather"}, "parameters": WEATHER_PARAMS},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }
    response_format: Any = {"type": "json_schema", "json_schema": {"name": "call", "schema": llama_form}}
    answer = await client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, max_tokens=300, temperature=1.0, seed=5,
        response_format=response_format,
    )  # fmt: skip
    assert answer.choices[0].finish_reason == "tool_calls"
    _check_calls(answer.choices[0].message.tool_calls, {"get_weather"})
    final = await _streamed(client, messages=USER, tools=TOOLS, response_format=response_format)
    _check_calls(final.choices[0].message.tool_calls, {"get_weather"})
    # Plain `auto` on a random model: whatever it writes is content, nothing invented.
    plain = await client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, max_tokens=20, seed=1)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content
    # `none`: the tools are not rendered, so the prompt is the plain chat's.
    none = await client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, tool_choice="none", max_tokens=4
    )
    without = await client.chat.completions.create(model="tiny", messages=USER, max_tokens=4)
    assert none.usage.prompt_tokens == without.usage.prompt_tokens < plain.usage.prompt_tokens


async def test_the_next_turn_takes_the_calls_and_the_tool_results(client: Any) -> None:
    _hermes(client)
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = await client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, tool_choice=named, max_tokens=300, seed=2
    )
    call = first.choices[0].message.tool_calls[0]
    turn = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'},
    ]
    second = await client.chat.completions.create(model="tiny", messages=turn, tools=TOOLS, max_tokens=8, seed=2)
    assert second.choices[0].finish_reason in ("stop", "length")
    engine_tokenizer = client.engine_tokenizer
    rendered = engine_tokenizer.apply_chat_template(
        [*USER, {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": call.function.name, "arguments": json.loads(call.function.arguments)}}]},
         {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'}],
        tools=[t for t in TOOLS], add_generation_prompt=True, tokenize=False,
    )  # fmt: skip
    assert "<tool_response>" in rendered and call.function.name in rendered
    assert second.usage.prompt_tokens == len(engine_tokenizer.encode(rendered, add_special_tokens=False))
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model="tiny", messages=[*turn[:2], {"role": "tool", "content": "x"}], tools=TOOLS, max_tokens=4
        )
    assert caught.value.body["param"] == "messages[2].tool_call_id"  # type: ignore[index]


async def test_bad_tools_are_400s_and_the_cache_keys_on_tool_choice(client: Any) -> None:
    _hermes(client)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model="tiny", messages=USER, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}
        )
    assert caught.value.body["param"] == "tool_choice"  # type: ignore[index]
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 5}}}]
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="tiny", messages=USER, tools=bad)
    assert caught.value.body["param"] == "tools[0].function.parameters"  # type: ignore[index]

    async def ask(tool_choice: Any, stream: bool = False) -> tuple[str, Any]:
        raw = await client.chat.completions.with_raw_response.create(
            model="tiny", messages=USER, tools=TOOLS, tool_choice=tool_choice, max_tokens=300, temperature=0
        )
        return raw.headers[contract.HEADER_RESPONSE_CACHE], raw.parse()

    how, first = await ask("required")
    assert how == contract.RESPONSE_CACHE_MISS
    how, again = await ask("required")
    assert how == contract.RESPONSE_CACHE_HIT  # replayed through the same parse: calls, not text
    assert [c.function.model_dump() for c in again.choices[0].message.tool_calls] == [
        c.function.model_dump() for c in first.choices[0].message.tool_calls
    ]
    how, _ = await ask({"type": "function", "function": {"name": "get_time"}})
    assert how == contract.RESPONSE_CACHE_MISS
    how, _ = await ask("auto")
    assert how == contract.RESPONSE_CACHE_MISS
