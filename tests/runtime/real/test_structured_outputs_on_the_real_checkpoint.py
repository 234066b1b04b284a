"""Structured outputs on the real SmolLM2-135M-Instruct through the server and the official client: a few
realistic schemas (and plain JSON mode), answered at once, each parsing and validating, greedy and
sampled, streamed and not."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
import openai

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "city": {"type": "string", "maxLength": 40},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
RECIPE = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "ingredients": {"type": "array", "items": {"type": "string", "maxLength": 40}, "minItems": 1, "maxItems": 6},
        "difficulty": {"enum": ["easy", "medium", "hard"]},
    },
    "required": ["title", "ingredients", "difficulty"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "maxLength": 40},
        "forecast": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "day": {"enum": ["monday", "tuesday", "wednesday", "thursday", "friday"]},
                    "celsius": {"type": "integer", "minimum": -40, "maximum": 50},
                },
                "required": ["day", "celsius"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["location", "forecast"],
    "additionalProperties": False,
}
CASES: list[tuple[str, dict[str, Any] | None]] = [
    ("Invent a person who lives in Paris. Answer in JSON.", PERSON),
    ("Give me a simple pancake recipe as JSON.", RECIPE),
    ("What is the weather in Berlin for the next days? Reply with JSON.", WEATHER),
    ('Reply with a JSON object with the keys "fruit" and "color" for a red apple.', None),  # json_object
]


async def test_realistic_schemas_validate(real_client: openai.AsyncOpenAI) -> None:
    async def ask(prompt: str, schema: dict[str, Any] | None, *, temperature: float, stream: bool) -> None:
        response_format: Any = (
            {"type": "json_object"}
            if schema is None
            else {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
        )
        kwargs: dict[str, Any] = {
            "model": "smollm2-135m-instruct",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 300,
            "temperature": temperature,
            "seed": 7,
            "response_format": response_format,
        }
        if stream:
            text, reason = "", None
            async for chunk in await real_client.chat.completions.create(stream=True, **kwargs):
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    reason = chunk.choices[0].finish_reason or reason
        else:
            answer = await real_client.chat.completions.create(**kwargs)
            text, reason = answer.choices[0].message.content or "", answer.choices[0].finish_reason
        assert reason == "stop", (prompt, text)
        value = json.loads(text)
        if schema is None:
            assert isinstance(value, dict), text
        else:
            jsonschema.validate(value, schema)

    await asyncio.gather(
        *(ask(p, s, temperature=0.0, stream=False) for p, s in CASES),
        *(ask(p, s, temperature=0.8, stream=True) for p, s in CASES),
    )
