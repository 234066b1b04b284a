"""The router's settings: one validated model, from flags (and the operator's Deployment args).

Every bound has a unit in its name. Errors name the flag's field (`holdTimeoutS: ...`).
"""

from __future__ import annotations

from typing import Final, Literal

import pydantic
from pydantic import alias_generators

from fleetlm_router import picker

# Final, so each name has its literal type and may stand where a `Policy` is expected.
POLICY_PREFIX_AFFINITY: Final = "prefix-affinity"
POLICY_LEAST_LOADED: Final = "least-loaded"
POLICY_ROUND_ROBIN: Final = "round-robin"
Policy = Literal["prefix-affinity", "least-loaded", "round-robin"]


class RouterSettings(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(
        extra="forbid", frozen=True, alias_generator=alias_generators.to_camel, populate_by_name=True
    )

    host: str = "127.0.0.1"
    port: int = pydantic.Field(default=8080, ge=0, le=65535)
    policy: Policy = POLICY_PREFIX_AFFINITY
    prefix_tokens: int = pydantic.Field(
        default=picker.DEFAULT_PREFIX_TOKENS, ge=1, le=65536, description="Leading prompt tokens hashed."
    )
    load_factor: float = pydantic.Field(
        default=picker.DEFAULT_LOAD_FACTOR, ge=1.0, le=10.0, description="Bounded load: at most this times the mean."
    )
    max_attempts: int = pydantic.Field(default=3, ge=1, le=16, description="Replicas tried before the first byte.")
    connect_timeout_s: float = pydantic.Field(default=2.0, gt=0, le=60)
    max_body_bytes: int = pydantic.Field(default=8 * 1024 * 1024, ge=1024)
    # Slow clients (slowloris): a connection gets this long to complete a request's headers, from its
    # opening or from its previous response (so it is also the idle keep-alive limit); a body this long.
    header_timeout_s: float = pydantic.Field(
        default=30.0, gt=0, le=3600, description="Headers must be complete this long after opening or the last answer."
    )
    body_timeout_s: float = pydantic.Field(
        default=30.0, gt=0, le=3600, description="The whole request body must arrive within this long."
    )
    # The replicas' own load, read from their /metrics (vLLM names): queued and running requests, KV usage.
    scrape_interval_s: float = pydantic.Field(
        default=0.5, ge=0, le=60, description="Period of the /metrics scrape of each replica; 0 turns it off."
    )
    scrape_timeout_s: float = pydantic.Field(default=0.5, gt=0, le=60, description="One scrape's time limit.")
    scrape_stale_s: float = pydantic.Field(
        default=3.0, gt=0, le=600, description="A replica's scraped load older than this is ignored."
    )
    queue_saturated: int = pydantic.Field(
        default=8, ge=1, le=100_000, description="Queued requests at which a replica counts as saturated."
    )
    kv_saturated: float = pydantic.Field(
        default=0.95, gt=0, le=1.0, description="KV-cache usage (0-1) at which a replica counts as saturated."
    )
    # Holding while no replica is ready (scale from zero, a rollout with none ready).
    hold_max_requests: int = pydantic.Field(default=256, ge=0, description="Requests held at once; 0 disables.")
    hold_timeout_s: float = pydantic.Field(default=300.0, ge=0, le=3600, description="Longest a request is held.")
    hold_comment_interval_s: float = pydantic.Field(
        default=5.0, gt=0, le=60, description="SSE comment period for held streams (keeps proxies from timing out)."
    )
    retry_after_s: int = pydantic.Field(default=5, ge=1, le=3600, description="Retry-After on the router's 503/429.")
    scale_up_interval_s: float = pydantic.Field(
        default=5.0, gt=0, le=600, description="At most one scale-up request per interval while holding."
    )
    activity_interval_s: float = pydantic.Field(
        default=30.0, gt=0, le=3600, description="At most one 'traffic seen' report per interval."
    )
