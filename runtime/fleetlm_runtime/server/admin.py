"""Live tuning: `GET /admin/config` shows the config in force, `PUT /admin/config` changes the live fields;
and `GET /admin/usage`, the usage ledger per tenant and class.

Both need the admin bearer token (a mounted Secret); without a configured token the API is closed.
A PUT takes the same camelCase shape as the config file, restricted to what can change without a
restart, all optional but at least one:

    {"batching": {"maxBatchSize": 16, "maxBatchTokens": 1024},
     "qos": {"classes": [{"name": "critical", "priority": 0, "weight": 2, "ttftTargetS": 0.5},
                         {"name": "batch", "priority": 9, "sheddable": true}],
             "defaultClass": "critical", "allowClassHeader": false, "shedClasses": ["batch"]},
     "caching": {"responseCache": {"enabled": true, "maxEntries": 1024, "maxBytes": 67108864, "ttlS": 300}}}

The operator pushes the first two sections (its tuning, and the spec's classes with their effective SLO
targets). The update is checked field by field (types, and every error names its field), merged into the
config in force and validated as a whole (so the batch pair stays consistent, the default class is one of
the classes and shed classes must be sheddable classes), then applied at once: the engine takes the limits
from its next step (in-flight requests are never dropped), admission takes the class table and the shed
classes from the next request, and `fleetlm_config_info` is republished so the operator can confirm the
push by scraping /metrics.

A new class table replaces the old one in one assignment (the event loop runs one handler at a time, so no
request sees half of it). A request already admitted keeps the priority and weight it was admitted with
and is served to its end, in the engine's queue as before, even when its class was removed or reweighted;
one that had been given its class but not yet admitted when its class was removed is refused with 429
(Retry-After), and its retry gets a class from the new table. A table that drops a class the API keys in
force still map to is refused (400 naming `qos.classes`): update the keys Secret first, so no key is left
without a class. When the classes change without `shedClasses`, shed classes the new table no longer has
as sheddable stop being shed.

Batch limits, classes and shed classes change no output and keep the response cache; a change of the
response-cache settings rebuilds it empty.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from fleetlm_runtime import config as config_mod
from fleetlm_runtime import contract
from fleetlm_runtime.server import auth, schemas
from fleetlm_runtime.server import state as state_mod

MAX_ADMIN_BODY_BYTES = 64 * 1024
MAX_LIMIT = 100_000_000
MAX_CLASSES = 64


def _int_in(low: int, high: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            return f"must be an integer in [{low}, {high}]"
        return None

    return check


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def _positive_number(value: Any) -> str | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 10**9
    return None if ok else "must be a number > 0"


def _class_name(value: Any) -> str | None:
    return None if isinstance(value, str) and 0 < len(value) <= 64 else "must be a class name"


def _class_table(value: Any) -> str | None:
    # Each entry is validated by the config's own QoSClass model once merged (errors name the field).
    if not isinstance(value, list) or not 0 < len(value) <= MAX_CLASSES:
        return f"must be a list of 1 to {MAX_CLASSES} class objects"
    if not all(isinstance(item, dict) for item in value):
        return 'must be a list of class objects such as {"name": "critical", "priority": 0}'
    return None


def _class_names(value: Any) -> str | None:
    if not isinstance(value, list) or len(value) > 64:
        return "must be a list of class names"
    if not all(isinstance(item, str) and 0 < len(item) <= 64 for item in value):
        return "must be a list of class names"
    return None


# Section path -> {camelCase field: (snake_case field, check)}: everything PUT may change.
LIVE_FIELDS: dict[tuple[str, ...], dict[str, tuple[str, Callable[[Any], str | None]]]] = {
    ("batching",): {
        "maxBatchSize": ("max_batch_size", _int_in(1, MAX_LIMIT)),
        "maxBatchTokens": ("max_batch_tokens", _int_in(1, MAX_LIMIT)),
    },
    ("qos",): {
        "classes": ("classes", _class_table),
        "defaultClass": ("default_class", _class_name),
        "allowClassHeader": ("allow_class_header", _bool),
        "shedClasses": ("shed_classes", _class_names),
    },
    ("caching", "responseCache"): {
        "enabled": ("enabled", _bool),
        "maxEntries": ("max_entries", _int_in(1, MAX_LIMIT)),
        "maxBytes": ("max_bytes", _int_in(1, 1 << 40)),
        "ttlS": ("ttl_s", _positive_number),
    },
}


def live_field_paths() -> list[str]:
    return [".".join((*section, name)) for section, fields in LIVE_FIELDS.items() for name in fields]


def _view(state: state_mod.ServerState) -> dict[str, Any]:
    cache = state.response_cache
    return {
        "config": config_mod.dump_config(state.config),
        "phase": str(state.phase),
        "liveFields": live_field_paths(),
        "responseCache": None
        if cache is None
        else {"entries": len(cache), "bytes": cache.num_bytes, "inFlight": cache.num_flights},
    }


async def get_config(request: web.Request) -> web.Response:
    state = request.app[state_mod.state_key]
    auth.check_admin(request, state.admin_token)
    return web.json_response(_view(state))


async def get_usage(request: web.Request) -> web.Response:
    """The usage ledger (server/ledger.py): per (tenant, class) and in total, since the server started."""
    state = request.app[state_mod.state_key]
    auth.check_admin(request, state.admin_token)
    return web.json_response(state.metrics.ledger.as_json())


async def put_config(request: web.Request) -> web.Response:
    state = request.app[state_mod.state_key]
    auth.check_admin(request, state.admin_token)
    if request.content_length is not None and request.content_length > MAX_ADMIN_BODY_BYTES:
        raise schemas.APIError(413, "admin request body too large", reason=contract.REJECT_TOO_LARGE)
    body = schemas.parse_json(await request.read())
    if not isinstance(body, dict):
        raise schemas.invalid(None, 'the body must be a JSON object such as {"batching": {"maxBatchSize": 16}}')
    version = body.get(contract.CONFIG_SCHEMA_VERSION_KEY, contract.CONFIG_SCHEMA_VERSION)
    if version != contract.CONFIG_SCHEMA_VERSION:
        raise schemas.invalid(contract.CONFIG_SCHEMA_VERSION_KEY, f"unsupported version {version!r}")
    updates = _updates(body)
    if not updates:
        raise schemas.invalid(None, f"nothing to change; live fields: {', '.join(live_field_paths())}")
    if ("qos", "shedClasses") in updates and ("qos", "classes") not in updates:
        problem = config_mod.shed_classes_problem(updates[("qos", "shedClasses")], state.config.qos.classes)
        if problem:
            raise schemas.invalid("qos.shedClasses", problem)
    merged = config_mod.dump_config(state.config)
    for path, value in updates.items():
        section = merged
        for part in path[:-1]:
            section = section[part]
        section[path[-1]] = value
    if ("qos", "classes") in updates and ("qos", "shedClasses") not in updates:
        sheddable = {c.get("name") for c in updates[("qos", "classes")] if c.get("sheddable") is True}
        merged["qos"]["shedClasses"] = [name for name in merged["qos"]["shedClasses"] if name in sheddable]
    try:
        new_config = config_mod.parse_config(merged)
    except config_mod.ConfigError as error:
        raise schemas.invalid(error.field, str(error)) from None
    orphaned = _classes_of_keys(state) - {c.name for c in new_config.qos.classes}
    if orphaned:
        raise schemas.invalid(
            "qos.classes",
            f"API keys in force map to {', '.join(sorted(orphaned))}, which the new classes drop: "
            "update the API keys file first",
        )
    state.apply_config(new_config)
    return web.json_response(_view(state))


def _classes_of_keys(state: state_mod.ServerState) -> set[str]:
    return set(state.api_keys.values())


def _updates(body: dict[str, Any]) -> dict[tuple[str, ...], Any]:
    """The live fields in `body` as {path: value}, each checked; a 400 naming the first bad field."""
    updates: dict[tuple[str, ...], Any] = {}
    sections = {path[0] for path in LIVE_FIELDS}
    for key in body:
        if key != contract.CONFIG_SCHEMA_VERSION_KEY and key not in sections:
            raise schemas.invalid(key, f"{key} cannot be changed live; live fields: {', '.join(live_field_paths())}")
    for section, fields in LIVE_FIELDS.items():
        node: Any = body
        for depth, part in enumerate(section):
            if not isinstance(node, dict) or part not in node:
                node = None
                break
            node = node[part]
            where = ".".join(section[: depth + 1])
            if not isinstance(node, dict) or not node:
                raise schemas.invalid(where, f"{where} must be an object with some of: {', '.join(fields)}")
            if depth + 1 < len(section):
                extra = [k for k in node if k != section[depth + 1]]
                if extra:
                    raise schemas.invalid(f"{where}.{extra[0]}", f"{where}.{extra[0]} cannot be changed live")
        if node is None:
            continue
        snake = {snake_name: camel for camel, (snake_name, _) in fields.items()}
        for name, value in node.items():
            camel = name if name in fields else snake.get(name)
            where = ".".join((*section, name))
            if camel is None:
                raise schemas.invalid(where, f"{where} cannot be changed live")
            problem = fields[camel][1](value)
            if problem:
                raise schemas.invalid(where, f"{where} {problem}")
            updates[(*section, camel)] = value
    return updates
