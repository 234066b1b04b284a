"""A request's class comes from its API key (the default class without a known key); where keys are
required, a missing or unknown key is 401. A client may name a class (header or body field) only where the
config allows it, and only one no better than its entitlement: a higher one is 403, whatever it sends."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import test_utils
from prometheus_client import parser

from fleetlm_runtime import config, contract, qos
from fleetlm_runtime.server import app as app_mod

CLASSES = [
    {"name": "critical", "priority": 0},
    {"name": "standard", "priority": 1, "weight": 2},
    {"name": "standard-lite", "priority": 1, "weight": 1},
    {"name": "sheddable", "priority": 2, "sheddable": True},
    {"name": "late-but-protected", "priority": 5},
]


def _cls(name: str) -> config.QoSClass:
    data = next(c for c in CLASSES if c["name"] == name)
    return config.QoSClass.model_validate(data)


@pytest.mark.parametrize(("ceiling", "requested", "allowed"), [
    ("critical", "critical", True),
    ("critical", "standard", True),
    ("critical", "sheddable", True),
    ("standard", "critical", False),  # runs sooner
    ("standard", "standard-lite", True),  # same priority, smaller share
    ("standard-lite", "standard", False),  # same priority, bigger share
    ("standard", "sheddable", True),
    ("sheddable", "standard", False),
    ("sheddable", "late-but-protected", False),  # later, but no longer sheddable
    ("standard", "late-but-protected", True),
])  # fmt: skip
def test_class_choice_table(ceiling: str, requested: str, allowed: bool) -> None:
    assert qos.may_choose(_cls(ceiling), _cls(requested)) is allowed


async def _post(
    server: test_utils.TestServer, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{server.port}/v1/completions", json=body, headers=headers or {}) as resp,
    ):
        return resp.status, dict(resp.headers), json.loads(await resp.text())


async def _served_by_class(server: test_utils.TestServer) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{server.port}/metrics") as resp:
        text = await resp.text()
    served: dict[str, float] = {}
    for family in parser.text_string_to_metric_families(text):
        if family.name == contract.REQUEST_SUCCESS:
            for sample in family.samples:
                served[sample.labels["qos_class"]] = served.get(sample.labels["qos_class"], 0) + sample.value
    return {k: v for k, v in served.items() if v}


BODY = {"model": "tiny", "prompt": "x", "max_tokens": 1}


@pytest.fixture
def keys_file(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "api-keys.yaml"
    path.write_text("key-critical: critical\nkey-standard: standard\nkey-shed: sheddable\n")
    return path


async def test_required_keys_401_for_missing_or_unknown(
    make_server: Callable[..., Awaitable[test_utils.TestServer]], small_config: Any, keys_file: pathlib.Path
) -> None:
    cfg = small_config(qos={"classes": CLASSES, "defaultClass": "standard", "apiKeysFile": str(keys_file),
                            "requireApiKey": True})  # fmt: skip
    server = await make_server(cfg, api_keys=config.load_api_keys(keys_file, classes={c["name"] for c in CLASSES}))
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic a2V5LWNyaXRpY2Fs"}):
        status, sent, reply = await _post(server, BODY, headers)
        assert status == 401, headers
        assert reply["error"]["type"] == "authentication_error" and reply["error"]["code"] == "invalid_api_key"
        assert sent["WWW-Authenticate"].startswith("Bearer")
    status, _, _ = await _post(server, BODY, {"Authorization": "Bearer key-critical"})
    assert status == 200
    assert await _served_by_class(server) == {"critical": 1}


async def test_a_header_can_lower_the_class_but_never_raise_it(
    make_server: Callable[..., Awaitable[test_utils.TestServer]], small_config: Any, keys_file: pathlib.Path
) -> None:
    cfg = small_config(qos={"classes": CLASSES, "defaultClass": "standard", "apiKeysFile": str(keys_file),
                            "allowClassHeader": True})  # fmt: skip
    server = await make_server(cfg, api_keys=config.load_api_keys(keys_file, classes={c["name"] for c in CLASSES}))
    standard_key = {"Authorization": "Bearer key-standard"}
    # Raising, by header or by body field: refused, and nothing runs.
    status, _, reply = await _post(server, BODY, {**standard_key, contract.HEADER_QOS_CLASS: "critical"})
    assert status == 403 and reply["error"]["type"] == "permission_error"
    assert reply["error"]["param"] == contract.FIELD_QOS_CLASS and reply["error"]["code"] == "qos_class_not_allowed"
    status, _, _ = await _post(server, {**BODY, contract.FIELD_QOS_CLASS: "critical"}, standard_key)
    assert status == 403
    status, _, _ = await _post(
        server, BODY, {"Authorization": "Bearer key-shed", contract.HEADER_QOS_CLASS: "standard"}
    )
    assert status == 403
    # Without a (known) key the entitlement is the default class.
    status, _, _ = await _post(server, BODY, {contract.HEADER_QOS_CLASS: "critical"})
    assert status == 403
    status, _, _ = await _post(server, BODY, {"Authorization": "Bearer unknown", contract.HEADER_QOS_CLASS: "critical"})
    assert status == 403
    assert await _served_by_class(server) == {}
    # Lowering (or naming one's own class) is fine.
    assert (await _post(server, BODY, {**standard_key, contract.HEADER_QOS_CLASS: "sheddable"}))[0] == 200
    assert (await _post(server, BODY, {**standard_key, contract.HEADER_QOS_CLASS: "standard"}))[0] == 200
    assert (await _post(server, BODY, {"Authorization": "Bearer key-critical"}))[0] == 200
    assert (await _post(server, BODY))[0] == 200  # no key: the default class
    assert await _served_by_class(server) == {"sheddable": 1, "standard": 2, "critical": 1}


async def test_without_header_permission_the_key_decides(
    make_server: Callable[..., Awaitable[test_utils.TestServer]], small_config: Any, keys_file: pathlib.Path
) -> None:
    cfg = small_config(qos={"classes": CLASSES, "defaultClass": "standard", "apiKeysFile": str(keys_file)})
    server = await make_server(cfg, api_keys=config.load_api_keys(keys_file, classes={c["name"] for c in CLASSES}))
    status, _, reply = await _post(server, BODY, {"Authorization": "Bearer key-critical",
                                                  contract.HEADER_QOS_CLASS: "sheddable"})  # fmt: skip
    assert status == 400 and reply["error"]["param"] == contract.FIELD_QOS_CLASS
    # Naming the class one has anyway is no choice, so it is accepted.
    status, _, _ = await _post(server, BODY, {"Authorization": "Bearer key-critical",
                                              contract.HEADER_QOS_CLASS: "critical"})  # fmt: skip
    assert status == 200
    assert (await _post(server, BODY, {"Authorization": "Bearer unknown"}))[0] == 200  # not required: default
    assert await _served_by_class(server) == {"critical": 1, "standard": 1}


def test_command_line_switches(keys_file: pathlib.Path) -> None:
    from fleetlm_runtime.__main__ import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args([]))
    assert cfg.qos.policy == contract.QOS_POLICY_PRIORITY and not cfg.qos.require_api_key
    args = ["--api-keys-file", str(keys_file), "--require-api-key", "--qos-policy", "fifo"]
    cfg = config_from_args(build_parser().parse_args(args))
    assert cfg.qos.api_keys_file == str(keys_file) and cfg.qos.require_api_key
    assert cfg.qos.policy == contract.QOS_POLICY_FIFO
    assert app_mod.engine_config_from(cfg).scheduling_policy == "fcfs"  # arrival order in the engine too
    with pytest.raises(config.ConfigError, match="requireApiKey needs apiKeysFile"):
        config_from_args(build_parser().parse_args(["--require-api-key"]))
