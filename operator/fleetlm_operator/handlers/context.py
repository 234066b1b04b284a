"""What every handler shares: the operator's settings and its API clients, kept in kopf's memo."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, cast

import kopf
from kubernetes import client

from fleetlm_operator import settings as settings_module
from fleetlm_operator.act import apply, leader

MEMO_KEY = "fleetlm"


@dataclasses.dataclass(slots=True)
class OperatorContext:
    settings: settings_module.OperatorSettings
    api_client: client.ApiClient
    applier: apply.Applier
    elector: leader.LeaseElector | None = None


def get(memo: kopf.Memo) -> OperatorContext:
    ctx = memo.get(MEMO_KEY)
    if not isinstance(ctx, OperatorContext):
        raise kopf.TemporaryError("the operator is still starting", delay=2)
    if ctx.elector is not None and not ctx.elector.is_leader:
        # Stepped down (the Lease could not be renewed in time): act on nothing while the process stops.
        raise kopf.TemporaryError("this replica no longer holds the leader Lease", delay=30)
    return ctx


def as_body(obj: Mapping[str, Any]) -> kopf.Body:
    """kopf's Body around an LLMService this operator read from the API itself (not one kopf handed in).

    kopf types its helpers (adopt, append_owner_reference, info, warn) for its Body, a read-only view
    of the object's dict; the API client returns a plain dict of the same shape (RawBody is its TypedDict).
    """
    return obj if isinstance(obj, kopf.Body) else kopf.Body(cast(kopf.RawBody, obj))
