"""The usage ledger: who used how much of the engine, per (tenant, QoS class).

Per pair it sums, for finished requests: prompt tokens computed, prompt tokens served from the prefix
cache (at first admission), generated tokens and engine-seconds (each step's duration split by its
tokens, measured by the engine core); and, for answers replayed from the response cache, the tokens
served from it (the completion tokens the engine did not have to generate). Fed from the same FINISHED
events as the engine's `fleetlm_prompt_tokens`/`fleetlm_generation_tokens` counters, so its totals equal
theirs. Tenants are bounded labels (a key's digest from the key file, or `auth.TENANT_OTHER`); past
`MAX_TENANTS` distinct ones (keys rotated many times without a restart) new ones fold into
`TENANT_OVERFLOW`, so neither this map nor the Prometheus series grow without bound. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
from typing import Any

MAX_TENANTS = 1000
TENANT_OVERFLOW = "overflow"


@dataclasses.dataclass(slots=True)
class Usage:
    prompt_tokens_computed: int = 0
    prompt_tokens_cached: int = 0  # served from the prefix cache
    response_cache_tokens: int = 0  # completion tokens replayed from the response cache
    response_cache_hits: int = 0  # answers replayed from the response cache
    generated_tokens: int = 0
    engine_seconds: float = 0.0
    requests: int = 0  # finished in the engine

    def as_json(self) -> dict[str, Any]:
        return {
            "promptTokensComputed": self.prompt_tokens_computed,
            "promptTokensCached": self.prompt_tokens_cached,
            "responseCacheTokens": self.response_cache_tokens,
            "responseCacheHits": self.response_cache_hits,
            "generatedTokens": self.generated_tokens,
            "engineSeconds": round(self.engine_seconds, 6),
            "requests": self.requests,
        }


class UsageLedger:
    def __init__(self, *, max_tenants: int = MAX_TENANTS) -> None:
        self._rows: dict[tuple[str, str], Usage] = {}
        self._tenants: set[str] = set()
        self._max_tenants = max_tenants

    def label(self, tenant: str) -> str:
        """The tenant as a bounded label value (see the module docstring)."""
        if tenant in self._tenants:
            return tenant
        if len(self._tenants) >= self._max_tenants:
            return TENANT_OVERFLOW
        self._tenants.add(tenant)
        return tenant

    def _row(self, tenant: str, qos_class: str) -> Usage:
        key = (tenant, qos_class)
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = Usage()
        return row

    def add_finished(
        self,
        *,
        tenant: str,
        qos_class: str,
        num_prompt_tokens: int,
        num_cached_tokens: int,
        num_output_tokens: int,
        engine_seconds: float,
    ) -> str:
        """A request that finished in the engine; returns the label it was booked under."""
        label = self.label(tenant)
        row = self._row(label, qos_class)
        cached = min(num_cached_tokens, num_prompt_tokens)
        row.prompt_tokens_cached += cached
        row.prompt_tokens_computed += num_prompt_tokens - cached
        row.generated_tokens += num_output_tokens
        row.engine_seconds += engine_seconds
        row.requests += 1
        return label

    def add_response_cache_hit(self, *, tenant: str, qos_class: str, num_output_tokens: int) -> str:
        """An answer replayed from the response cache (stored or shared); returns the label booked under."""
        label = self.label(tenant)
        row = self._row(label, qos_class)
        row.response_cache_tokens += num_output_tokens
        row.response_cache_hits += 1
        return label

    def rows(self) -> dict[tuple[str, str], Usage]:
        return {key: dataclasses.replace(row) for key, row in self._rows.items()}

    def totals(self) -> Usage:
        total = Usage()
        for row in self._rows.values():
            for f in dataclasses.fields(Usage):
                setattr(total, f.name, getattr(total, f.name) + getattr(row, f.name))
        return total

    def as_json(self) -> dict[str, Any]:
        """The `GET /admin/usage` body: one entry per (tenant, class), sorted, and the totals."""
        return {
            "usage": [
                {"tenant": tenant, "qosClass": qos_class, **row.as_json()}
                for (tenant, qos_class), row in sorted(self._rows.items())
            ],
            "totals": self.totals().as_json(),
        }
