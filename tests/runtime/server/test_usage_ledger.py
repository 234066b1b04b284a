"""The usage ledger (issue 18.2) on the real server and engine: per tenant (API key) and class, its totals
equal the engine's own counters in /metrics, prefix-cache hits and response-cache hits are booked to the
tenant that got them, the same figures are exported as bounded Prometheus series and as GET /admin/usage
(admin token), and nobody's key appears anywhere."""

from __future__ import annotations

import asyncio
import hashlib
import pathlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import test_utils
from prometheus_client import parser

from fleetlm_runtime import config, contract

TOKEN = "test-admin-token-0123456789"  # the conftest's ADMIN_TOKEN
CLASSES = [{"name": "gold", "priority": 0, "weight": 3}, {"name": "standard", "priority": 0, "weight": 1}]
KEYS = {"key-alice-0001": "standard", "key-bob-0002": "standard", "key-carol-0003": "gold"}
GREEDY = {"model": "tiny", "temperature": 0.0, "ignore_eos": True}
SHARED = "A shared system prompt that is long enough to fill several KV blocks of sixteen tokens. " * 3


def _tenant(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


async def _post(session: aiohttp.ClientSession, url: str, key: str | None, body: dict[str, Any]) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with session.post(f"{url}/v1/completions", json={**GREEDY, **body}, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def _usage(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(f"{url}/admin/usage", headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
        assert resp.status == 200
        return await resp.json()


async def _metrics(session: aiohttp.ClientSession, url: str) -> list[Any]:
    async with session.get(f"{url}/metrics") as resp:
        return [s for f in parser.text_string_to_metric_families(await resp.text()) for s in f.samples]


def _sum(samples: list[Any], name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def test_ledger_totals_equal_the_engine_counters_and_cache_hits_go_to_their_tenant(
    make_server: Callable[..., Awaitable[test_utils.TestServer]], small_config: Any, tmp_path: pathlib.Path
) -> None:
    keys_file = tmp_path / "api-keys.yaml"
    keys_file.write_text("".join(f"{k}: {c}\n" for k, c in KEYS.items()))
    cfg = small_config(
        qos={"classes": CLASSES, "defaultClass": "standard", "apiKeysFile": str(keys_file)},
        caching={"responseCache": {"enabled": True, "maxEntries": 64, "ttlS": 300}},
    )
    server = await make_server(cfg, api_keys=config.load_api_keys(keys_file, classes={c["name"] for c in CLASSES}))
    url = f"http://127.0.0.1:{server.port}"
    alice, bob, carol = _tenant("key-alice-0001"), _tenant("key-bob-0002"), _tenant("key-carol-0003")
    async with aiohttp.ClientSession() as session:
        first = await _post(session, url, "key-alice-0001", {"prompt": "Ledger entry one", "max_tokens": 9})
        await _post(session, url, "key-bob-0002", {"prompt": SHARED + "first", "max_tokens": 5})
        await _post(session, url, "key-bob-0002", {"prompt": SHARED + "second", "max_tokens": 6})  # prefix hit
        await asyncio.gather(
            _post(session, url, "key-carol-0003", {"prompt": "Gold class", "max_tokens": 7}),
            _post(session, url, None, {"prompt": "Nobody's key", "max_tokens": 4}),
        )
        async with session.post(
            f"{url}/v1/completions",
            json={**GREEDY, "prompt": "Ledger entry one", "max_tokens": 9},
            headers={"Authorization": "Bearer key-alice-0001"},
        ) as resp:  # alice's exact repeat: replayed from the response cache
            assert resp.headers[contract.HEADER_RESPONSE_CACHE] == contract.RESPONSE_CACHE_HIT
            repeat = await resp.json()
        assert repeat["usage"] == first["usage"]
        deadline = time.monotonic() + 10
        while (usage := await _usage(session, url))["totals"]["requests"] < 5:  # FINISHED events follow replies
            assert time.monotonic() < deadline, usage
            await asyncio.sleep(0.02)
        samples = await _metrics(session, url)
        async with session.get(f"{url}/admin/usage") as resp:
            assert resp.status == 401  # the admin token is required
    rows = {(r["tenant"], r["qosClass"]): r for r in usage["usage"]}
    assert set(rows) == {(alice, "standard"), (bob, "standard"), (carol, "gold"), (contract.TENANT_OTHER, "standard")}
    totals = usage["totals"]
    # The ledger's totals are the engine's own counters.
    engine_prompt = _sum(samples, contract.sample_name(contract.PROMPT_TOKENS))
    engine_generated = _sum(samples, contract.sample_name(contract.GENERATION_TOKENS))
    prefix_hits = _sum(samples, contract.sample_name(contract.PREFIX_CACHE_HITS))
    assert totals["promptTokensComputed"] + totals["promptTokensCached"] == engine_prompt > 0
    assert totals["generatedTokens"] == engine_generated == 9 + 5 + 6 + 7 + 4
    assert totals["promptTokensCached"] == prefix_hits > 0  # nothing was preempted: hits at first admission
    # Bob's second prompt shares whole blocks with his first; the prefix cache served them, to him.
    assert rows[bob, "standard"]["promptTokensCached"] == prefix_hits
    # The response-cache hit is alice's: her completion tokens, not generated a second time.
    assert rows[alice, "standard"]["responseCacheHits"] == 1
    assert rows[alice, "standard"]["responseCacheTokens"] == first["usage"]["completion_tokens"] == 9
    assert rows[alice, "standard"]["generatedTokens"] == 9 and rows[alice, "standard"]["requests"] == 1
    assert all(r["responseCacheHits"] == 0 for key, r in rows.items() if key[0] != alice)
    assert all(r["engineSeconds"] > 0 for r in rows.values())
    # The Prometheus series carry the same figures, labelled by tenant, and never a key.
    usage_prompt = contract.sample_name(contract.USAGE_PROMPT_TOKENS)
    for (tenant, qos_class), row in rows.items():
        labels = {"tenant": tenant, "qos_class": qos_class}
        assert _sum(samples, usage_prompt, source="computed", **labels) == row["promptTokensComputed"]
        assert _sum(samples, usage_prompt, source="prefix_cache", **labels) == row["promptTokensCached"]
        assert _sum(samples, contract.sample_name(contract.USAGE_GENERATION_TOKENS), **labels) == row["generatedTokens"]
        response_tokens = contract.sample_name(contract.USAGE_RESPONSE_CACHE_TOKENS)
        assert _sum(samples, response_tokens, **labels) == row["responseCacheTokens"]
        engine_s = _sum(samples, contract.sample_name(contract.USAGE_ENGINE_SECONDS), **labels)
        assert abs(engine_s - row["engineSeconds"]) < 1e-5
    tenants = {s.labels["tenant"] for s in samples if "tenant" in s.labels}
    assert tenants == {alice, bob, carol, contract.TENANT_OTHER}
    assert not any(key in str(s.labels) for s in samples for key in KEYS)
