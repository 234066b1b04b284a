"""Scale to zero, a kopf timer per LLMService with `spec.replicas.idleTimeout`: read -> policy.idle -> act.

Reads the router's last-request annotation and the replica count `/scale` holds, asks `policy.idle`, and
when it says 0 writes `spec.replicas.desired: 0` (where /scale and the spec handler read it, like the
tuner does) and records an Event. Scaling back up is the router's: it patches `/scale` to 1 when a
request arrives at zero. Kubernetes v1.37 HPA scale-to-zero: an HPA targeting the LLMService's /scale
(Object or External metric, minReplicas 0) may write 0 too; both then write the same field through the
same subresource, the router's "at zero, ask for 1" still holds requests, and the LLMService's CEL range
rule keeps either within min..max. Run one of the two idle policies per service, not both (README).
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from typing import Any

import kopf

from fleetlm_operator.api import fields, models, names
from fleetlm_operator.handlers import context, reconcile
from fleetlm_operator.policy import idle

TICK_S = 5.0
MEMO_KEY = "fleetlm_idle"


@dataclasses.dataclass
class IdleMemory:
    replicas: int = -1
    since_s: float = 0.0


def parse_stamp(value: str | None) -> float | None:
    """The router's ISO-8601 stamp as epoch seconds; None when absent or unreadable (never "long ago")."""
    if not value:
        return None
    try:
        stamp = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=datetime.UTC)
    return stamp.timestamp()


@kopf.timer(names.GROUP, names.VERSION, names.PLURAL, interval=TICK_S, initial_delay=TICK_S,
            field="spec.replicas.idleTimeout", value=kopf.PRESENT)  # fmt: skip
async def scale_to_zero(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    try:
        svc = models.load_stored(reconcile.plain_body(body))
    except ValueError:
        return  # the spec handler reports an invalid object
    if svc.spec.replicas.idle_timeout is None:
        return
    memory = memo.get(MEMO_KEY)
    if not isinstance(memory, IdleMemory):
        memory = IdleMemory()
        memo[MEMO_KEY] = memory
    now_s = time.time()
    desired = svc.spec.replicas.effective
    if desired != memory.replicas:  # a new count (first sight, or a scale-up): its idle clock starts now
        memory.replicas, memory.since_s = desired, now_s
    annotations = body.get("metadata", {}).get("annotations") or {}
    decision = idle.decide(idle.IdleInput(
        now_s=now_s, idle_timeout_s=fields.parse_duration_s(svc.spec.replicas.idle_timeout),
        min_replicas=svc.spec.replicas.min, desired_replicas=desired,
        last_request_s=parse_stamp(annotations.get(names.ANNOTATION_LAST_REQUEST)), observed_since_s=memory.since_s,
    ))  # fmt: skip
    if decision.replicas is None:
        return
    ctx = context.get(memo)
    ctx.applier.patch_llmservice_replicas(svc.name, svc.namespace, decision.replicas)
    kopf.info(body, reason="ScaledToZero", message=decision.reason)
    logger.info("%s/%s: %s", svc.namespace, svc.name, decision.reason)
