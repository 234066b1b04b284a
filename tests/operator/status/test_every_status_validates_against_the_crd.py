"""Every status the operator writes validates against the generated CRD, built through the same functions
the handlers call: the tuner's sections and decision records (every action, act and advise), the rollout's
fields and conditions, the model cache's, and the tuning the reconcile computes. The validator is the
CRD's structural schema with undeclared fields refused (the API server would prune them silently), so a
status key renamed on one side only fails here. tests/operator/cluster/test_status_round_trips_unpruned.py
sends a few of them through the real API server.
"""

from __future__ import annotations

import datetime
import itertools
from typing import Any

import pytest

from fleetlm_dev import crd_schema
from fleetlm_operator import bridge
from fleetlm_operator.api import models, status_models
from fleetlm_operator.builders import model_cache as model_cache_builder
from fleetlm_operator.handlers import model_cache as model_cache_handler
from fleetlm_operator.handlers import reconcile
from fleetlm_operator.policy import decide, state, window
from fleetlm_operator.policy import spec as spec_mod
from fleetlm_operator.status import conditions

NOW = datetime.datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=datetime.UTC)
VALIDATOR = crd_schema.status_validator()


def _valid(status: dict[str, Any]) -> None:
    assert crd_schema.errors(VALIDATOR, status) == [], status


def _service(**spec: Any) -> models.LLMService:
    body = {
        "metadata": {"name": "chat", "namespace": "ns", "generation": 3},
        "spec": {
            "model": {"source": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"},
            "slo": {"ttft": "500ms", "tpot": "50ms", "percentile": 99},
            "qos": {
                "classes": [
                    {"name": "critical", "priority": 10, "weight": 6},
                    {"name": "batch", "priority": 1, "sheddable": True},
                ],
                "defaultClass": "critical",
            },
            **spec,
        },
    }
    return models.load_stored(body)


def _decisions(svc: models.LLMService) -> list[decide.Decision]:
    spec = bridge.policy_spec_of(svc.spec)
    empty = window.unavailable("no pods scraped", now_s=NOW.timestamp(), quantile=spec.slo.percentile / 100)
    full = _measured_window()
    loading = (3.0, 400.0)
    started = (spec_mod.PodStartup("chat-a", 61.5, 300.0),)
    out = []
    for observed, ages, ready in ((empty, (), ()), (full, loading, started)):
        policy_input = spec_mod.PolicyInput(spec, current_replicas=2, ready_replicas=1, loading_ages_s=ages,
                                            started=ready)  # fmt: skip
        out.append(decide.decide(policy_input, observed, state.TunerState(), now=NOW.timestamp()))
    return out


def test_the_tuners_sections_validate() -> None:
    svc = _service()
    spec = bridge.policy_spec_of(svc.spec)
    for decision in _decisions(svc):
        for observed in (
            window.unavailable("no pods scraped", now_s=NOW.timestamp(), quantile=0.99),
            _measured_window(),
        ):
            _valid({
                "observed": status_models.status_json(bridge.observed_status(observed, percentile=spec.slo.percentile,
                                                                      now=NOW)),
                "startup": status_models.status_json(bridge.startup_status(decision)),
                "tuning": status_models.status_json(status_models.TuningStatus(
                    max_batch_size=decision.max_batch_size, max_batch_tokens=decision.max_batch_tokens,
                    shed_classes=list(decision.shed_classes), class_weights={"critical": 6, "batch": 1})),
            })  # fmt: skip


def _measured_window() -> window.ObservedWindow:
    empty = window.unavailable("", now_s=NOW.timestamp(), quantile=0.99, num_pods_expected=3)
    values = {name: getattr(empty, name) for name in window.ObservedWindow.__dataclass_fields__}
    values.update(start_s=NOW.timestamp() - 300.0, num_pods_sampled=3, num_pods_with_delta=3, complete=True,
                  num_requests=900, ttft_quantile_s=0.41234567, tpot_quantile_s=0.031, slo_attainment=0.97,
                  finished_per_s=3.0, num_waiting=4.0, num_running=30.0, gpu_utilization=0.8)  # fmt: skip
    return window.ObservedWindow(**values)


@pytest.mark.parametrize("advise", [False, True])
def test_every_decision_record_validates_and_the_history_stays_in_bounds(advise: bool) -> None:
    svc = _service()
    decision = _decisions(svc)[0]
    combos = [list(c) for n in (1, 2, 3) for c in itertools.combinations(status_models.DECISION_ACTIONS, n)]
    history: list[dict[str, Any]] = []
    for actions in combos:
        record = bridge.decision_record(decision, actions=actions, now=NOW, advise=advise)
        history = [status_models.status_json(r) for r in bridge.bounded_history(history, record)]
        _valid({"decisions": history})
    assert len(history) == status_models.MAX_DECISIONS
    assert history[-1]["time"] == "2026-03-04T05:06:07Z"  # to the second, as the API server writes time


def test_the_actions_the_tuner_names_are_the_ones_the_crd_documents() -> None:
    svc = _service()
    decision = _decisions(svc)[0]
    seen: set[str] = set()
    for replicas, limits, shed in itertools.product(
        (1, decision.replicas, 10),
        ((1, 1), (decision.max_batch_size, decision.max_batch_tokens), (10**6, 10**6)),
        ((), ("batch",)),
    ):
        seen.update(bridge.decision_actions(decision, current_replicas=replicas, current_limits=limits,
                                            current_shed=shed))  # fmt: skip
    assert seen <= set(status_models.DECISION_ACTIONS)
    with pytest.raises(ValueError, match="not recorded"):
        bridge.decision_record(decision, actions=[], now=NOW)


def _deployment(*, desired: int, ready: int) -> dict[str, Any]:
    return {
        "metadata": {"generation": 1},
        "spec": {"replicas": desired},
        "status": {"replicas": desired, "readyReplicas": ready, "updatedReplicas": desired, "observedGeneration": 1,
                   "conditions": [{"type": "Progressing", "status": "True", "reason": "NewRSAvailable"}]},
    }  # fmt: skip


UNSCHEDULABLE = {
    "metadata": {},
    "status": {
        "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes: no GPU"}
        ]
    },
}


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("deployment", [None, _deployment(desired=2, ready=0), _deployment(desired=2, ready=2)])
def test_the_rollout_status_validates(cached: bool, deployment: dict[str, Any] | None) -> None:
    model = {"source": "hf://HuggingFaceTB/SmolLM2-135M-Instruct", **({"cache": {"size": "2Gi"}} if cached else {})}
    svc = _service(model=model, router={"enabled": cached})
    body = {"metadata": {"generation": 3}, "status": {"modelCache": {"phase": "Filling"}}}
    caches: list[status_models.ModelCacheStatus | None] = [None]
    if cached:
        caches += [model_cache_builder.cache_status(svc, None),
                   status_models.ModelCacheStatus(phase="Failed", claim_name="c", job_name="j", reason="SourceNotFound",
                                           message="no such repo"),
                   status_models.ModelCacheStatus(phase="Ready", claim_name="c", job_name="j", bytes_done=10,
                                           bytes_total=10)]  # fmt: skip
    for cache in caches:
        status = reconcile.render_rollout_status(svc, body=body, deployment=deployment, pods=[UNSCHEDULABLE],
                                                 cache=cache, now=NOW)  # fmt: skip
        _valid(status)
        if cache is not None:
            _valid({"modelCache": model_cache_handler.status_patch(cache)})  # nulls clear stale fields


def test_the_tuners_conditions_and_the_reconciles_tuning_validate() -> None:
    svc = _service()
    for decision in _decisions(svc):
        applied = conditions.for_apply([], bridge.decision_conditions(decision), owned=conditions.TUNER_TYPES,
                                       now=NOW, observed_generation=3)  # fmt: skip
        _valid({"conditions": applied})
    stored = _service(batching={"autotune": True})
    _valid({"tuning": status_models.status_json(reconcile.current_tuning(stored))})
    _valid({"tuning": status_models.status_json(models.initial_tuning(svc.spec))})


def test_a_field_the_crd_does_not_declare_is_refused() -> None:
    # The check itself: the API server would prune these silently, the validator names them.
    assert crd_schema.errors(VALIDATOR, {"observed": {"ttftP95Seconds": 0.4}})
    assert crd_schema.errors(VALIDATOR, {"decisions": [{"time": "2026-01-01T00:00:00Z", "action": "ScaleUp",
                                                        "reason": "r"}]})  # fmt: skip
    assert crd_schema.errors(VALIDATOR, {"tuning": {"maxBatchSize": 0}})


def test_the_tuners_queue_bounds_survive_the_reconcile_for_classes_that_exist() -> None:
    # status.tuning.queueLimits is what the pods were pushed: the reconcile renders it again (ConfigMap), for
    # classes still in the spec, never above a class's queueLimit as edited since.
    svc = _service(
        qos={
            "classes": [{"name": "critical", "priority": 10}, {"name": "batch", "priority": 1, "queueLimit": 4}],
            "defaultClass": "critical",
        }
    )
    body = svc.model_dump(by_alias=True, exclude_none=True, mode="json")
    body["status"] = {"tuning": {"queueLimits": {"critical": 6, "batch": 9, "gone": 3}}}
    tuning = reconcile.current_tuning(models.load_stored(body))
    assert tuning.queue_limits == {"critical": 6, "batch": 4}
    _valid({"tuning": status_models.status_json(tuning)})
    assert crd_schema.errors(VALIDATOR, {"tuning": {"queueLimits": {"critical": "six"}}})
