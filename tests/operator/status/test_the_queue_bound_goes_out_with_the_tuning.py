"""The tuner's queue bound sized in time (`policy.queuebound`) reaches the pods through the existing tuning
path: status.tuning.queueLimits, the ConfigMap rendered from it and the live push, even on a tick that moves
nothing else (no replica, batch or shed change to record); advice applies none of it."""

from __future__ import annotations

import dataclasses
from typing import Any

from fleetlm_dev.policy_inputs import build_window
from fleetlm_operator import bridge
from fleetlm_operator.api import models, status_models
from fleetlm_operator.handlers import reconcile, tune
from fleetlm_operator.policy import spec as spec_mod
from fleetlm_operator.policy import state

NOW_S = 1_800_000_000.0


def _service(**spec: Any) -> models.LLMService:
    body = {
        "metadata": {"name": "chat", "namespace": "ns", "generation": 1},
        "spec": {"model": {"source": "builtin:tiny"}, "slo": {"ttft": "500ms", "tpot": "50ms"}, **spec},
    }
    return models.load_stored(body)


def _plan(
    svc: models.LLMService, tuning_now: status_models.TuningStatus, stored: state.TunerState | None = None
) -> tune.Plan:
    spec = bridge.policy_spec_of(svc.spec)
    # Four pods running batches of 30 with 4 s of service each: steady, nothing to scale or re-batch.
    observed = dataclasses.replace(build_window(pods=4, running_per_pod=30.0, service_s=4.0), end_s=NOW_S)
    seen = tune.Observation(
        endpoints={},
        window=observed,
        policy_input=spec_mod.PolicyInput(spec, current_replicas=4, ready_replicas=4),
        state=stored or state.TunerState(),
        tuning_now=tuning_now,
    )
    return tune.plan(svc, spec, seen, now_s=NOW_S)


def test_a_new_queue_bound_alone_is_written_and_pushed() -> None:
    svc = _service()
    tick = _plan(svc, reconcile.current_tuning(svc))
    limits = dict(tick.decision.queue_limits)
    assert limits and set(limits) == {"default"}
    assert tick.config_tuning is not None and tick.config_tuning.queue_limits == limits  # status + ConfigMap
    assert tick.live_tuning.queue_limits == limits  # the live push
    assert tick.tuning_event is not None and tick.tuning_event[0] == "Tuned"
    assert tick.status_sections["tuning"]["queueLimits"] == limits
    # Next tick (the state annotation and status as this tick wrote them), the same bound: nothing to write again.
    again = _plan(svc, tick.config_tuning, tick.decision.state)
    assert again.decision.queue_limits == limits
    assert again.config_tuning is None


def test_advice_records_the_bound_and_pushes_none() -> None:
    svc = _service(autoscaling={"mode": "advise"})
    tick = _plan(svc, reconcile.current_tuning(svc))
    assert tick.decision.queue_limits
    assert tick.config_tuning is None
    assert tick.live_tuning.queue_limits == {}
    assert "queueLimits" not in tick.status_sections["tuning"] or not tick.status_sections["tuning"]["queueLimits"]
