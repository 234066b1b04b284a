"""Fixtures for the structured-output tests: JSON Schemas that a random-weight model must still satisfy.

The tiny model's weights are random, so only the grammar makes its output JSON. Every schema here bounds
what can grow (strings by maxLength, arrays by maxItems, numbers by a range), so each output completes in
a bounded number of tokens and `max_tokens` below is always enough: a cut answer would be a failure of the
test, not a property of the model. Helpers are fixtures because test modules cannot import this file
(pytest runs with --import-mode=importlib).
"""

from __future__ import annotations

from typing import Any

import pytest

MAX_TOKENS = 400

_S = {"type": "string", "maxLength": 8}
_INT = {"type": "integer", "minimum": -50, "maximum": 999}


def _obj(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


SCHEMAS: list[dict[str, Any]] = [
    _obj({"name": _S, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    _obj({"ok": {"type": "boolean"}}),
    _obj({"color": {"enum": ["red", "green", "blue"]}}),
    _obj({"status": {"type": "string", "enum": ["queued", "running", "done", "failed"]}, "code": _INT}),
    _obj({"tags": {"type": "array", "items": _S, "maxItems": 3}}),
    _obj({"ids": {"type": "array", "items": _INT, "minItems": 1, "maxItems": 4}}),
    _obj({"point": _obj({"x": _INT, "y": _INT})}),
    _obj(
        {"user": _obj({"name": _S, "address": _obj({"city": _S, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})})}
    ),
    _obj(
        {
            "items": {
                "type": "array",
                "items": _obj({"sku": _S, "qty": {"type": "integer", "minimum": 1, "maximum": 9}}),
                "maxItems": 2,
            }
        }
    ),
    _obj({"a": _S, "b": _INT, "c": {"type": "boolean"}}, required=["a"]),
    _obj({"maybe": {"anyOf": [{"type": "null"}, _INT]}}),
    _obj({"value": {"type": ["string", "integer"], "maxLength": 6, "minimum": 0, "maximum": 99}}),
    _obj({"price": {"type": "number", "minimum": 0, "maximum": 100}}),
    _obj(
        {
            "matrix": {
                "type": "array",
                "items": {"type": "array", "items": {"enum": [0, 1]}, "maxItems": 3},
                "maxItems": 3,
            }
        }
    ),
    _obj({"kind": {"const": "event"}, "level": {"enum": [1, 2, 3]}}),
    _obj({"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}}),
    {"type": "array", "items": _obj({"k": _S, "v": _INT}), "minItems": 1, "maxItems": 3},
    {"enum": ["yes", "no", "maybe"]},
    _obj(
        {
            "meta": _obj(
                {
                    "version": {"type": "integer", "minimum": 1, "maximum": 3},
                    "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
                }
            ),
            "name": _S,
        }
    ),
    {
        "type": "object",
        "$defs": {"leaf": _obj({"id": _INT, "label": _S})},
        "properties": {
            "first": {"$ref": "#/$defs/leaf"},
            "rest": {"type": "array", "items": {"$ref": "#/$defs/leaf"}, "maxItems": 2},
        },
        "required": ["first", "rest"],
        "additionalProperties": False,
    },
    _obj({"shape": {"oneOf": [_obj({"circle": _INT}), _obj({"square": _INT})]}}),
    _obj({"empty": _obj({}), "list": {"type": "array", "items": _S, "maxItems": 0}}),
    _obj(
        {
            "score": {"type": "integer", "minimum": 0, "maximum": 10},
            "comment": {"type": "string", "minLength": 1, "maxLength": 12},
        }
    ),
    _obj({"deep": _obj({"deeper": _obj({"deepest": _obj({"leaf": {"enum": ["x", "y"]}})})})}),
]


@pytest.fixture(scope="session")
def schemas() -> list[dict[str, Any]]:
    return SCHEMAS


@pytest.fixture(scope="session")
def max_tokens() -> int:
    return MAX_TOKENS


def _server_config(**overrides: Any) -> Any:
    """The real app on the tiny model with the engine in its own process (the production layout, so every
    constraint crosses the process pipe), a small batch and a KV pool that concurrent requests overflow."""
    from fleetlm_runtime import config

    data: dict[str, Any] = {
        "model": {"source": "builtin:tiny", "dtype": "float32", "maxModelLen": 512},
        "batching": {"maxBatchSize": 16, "maxBatchTokens": 256, "maxQueueLen": 128, "maxKvTokens": 640},
        "server": {"engineProcess": True},
        "caching": {"responseCache": {"enabled": False}},
    }
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return config.parse_config(data)


@pytest.fixture(scope="session")
def server_config() -> Any:
    return _server_config


@pytest.fixture
async def make_app_server(aiohttp_server: Any) -> Any:
    import asyncio

    from fleetlm_runtime.server import app as app_mod

    async def make(cfg: Any) -> Any:
        app = app_mod.create_app(cfg, admin_token=None)
        server = await aiohttp_server(app)
        await asyncio.wait_for(app[app_mod.engine_task_key], timeout=120)
        return server

    return make
