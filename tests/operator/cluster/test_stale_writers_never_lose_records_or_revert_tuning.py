"""status.decisions and status.tuning against the real API server, written from stale copies of the object.

The race CI once hit (test_advisory_mode_applies_nothing.py): the tuner pushed a shrunk batch limit and
recorded it, while the spec handler, reconciling the `act` switch from a copy read before that tick's
status write, wrote status.tuning (and the ConfigMap) back from its copy, and a tick appending to a stale
history drops the records written since. Here each stale write is made deterministic: the copy is read,
the other writer writes, then the stale one runs through the handlers' own functions.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from typing import Any

import kopf
import pytest
import yaml
from kubernetes import config

from fleetlm_dev import crd_schema
from fleetlm_operator import bridge, settings
from fleetlm_operator.act import apply
from fleetlm_operator.api import models, status_models
from fleetlm_operator.handlers import context, reconcile, tune
from fleetlm_operator.policy import window

pytestmark = pytest.mark.cluster

LOGGER = logging.getLogger(__name__)
NOW = datetime.datetime(2026, 3, 4, 5, 6, 7, tzinfo=datetime.UTC)


def _context(kube: Any) -> context.OperatorContext:
    api_client = config.new_client_from_config(config_file=str(kube.plane.kubeconfig))
    return context.OperatorContext(
        settings=settings.OperatorSettings(), api_client=api_client, applier=apply.Applier(api_client)
    )


def _autotuned_service(kube: Any, make_example: Any, prefix: str) -> tuple[str, kopf.Memo]:
    """An LLMService with batch autotuning, and the memo the handlers read their context from."""
    name = kube.new_name(prefix)
    body = make_example(name)
    body["spec"]["batching"] = {**body["spec"].get("batching", {}), "autotune": True}
    kube.apply(body)
    memo = kopf.Memo()
    memo[context.MEMO_KEY] = _context(kube)
    return name, memo


def _reconcile(body: dict[str, Any], memo: kopf.Memo) -> None:
    """The spec handler on `body`, as kopf runs it on resume (no Event, so no kopf context needed)."""
    reconcile.on_spec(kopf.Body(body), patch=kopf.Patch(), memo=memo, logger=LOGGER, reason="resume")


def _record(action: str, second: int) -> status_models.DecisionRecord:
    return status_models.DecisionRecord(time=NOW.replace(second=second), action=action, reason=f"tick {second}")


def test_records_appended_from_stale_copies_are_all_kept(kube: Any, make_example: Any, llmservice_crd: object) -> None:
    name = kube.new_name("hist")
    kube.apply(make_example(name))
    ctx = _context(kube)
    stale = kube.get("llmservice", name)
    sections = {"tuning": status_models.status_json(status_models.TuningStatus(max_batch_size=4, max_batch_tokens=512))}
    tune._write_status(stale, sections, _record("batch_shrink", 1), ctx=ctx, logger=LOGGER)
    # Read before the first write: appending to its history alone would drop batch_shrink.
    tune._write_status(stale, sections, _record("scale_up", 2), ctx=ctx, logger=LOGGER)
    status = kube.get("llmservice", name)["status"]
    assert [d["action"] for d in status["decisions"]] == ["batch_shrink", "scale_up"], status["decisions"]


def test_a_reconcile_from_a_stale_copy_never_reverts_the_tuning(
    kube: Any, make_example: Any, llmservice_crd: object
) -> None:
    name, memo = _autotuned_service(kube, make_example, "tune")
    ctx = context.get(memo)
    _reconcile(kube.get("llmservice", name), memo)
    reconciled = kube.get("llmservice", name)
    initial = reconciled["status"]["tuning"]["maxBatchSize"]
    shrunk = initial // 2
    # The tuner's tick: it pushed a shrunk limit and records it, after the spec handler read its copy.
    tune._write_status(
        reconciled,
        {"tuning": {**reconciled["status"]["tuning"], "maxBatchSize": shrunk}},
        _record("batch_shrink", 1),
        ctx=ctx,
        logger=LOGGER,
    )
    with pytest.raises(kopf.TemporaryError, match="reconciling the fresh object"):
        _reconcile(reconciled, memo)
    assert kube.get("llmservice", name)["status"]["tuning"]["maxBatchSize"] == shrunk
    # kopf's retry sees the fresh object: the ConfigMap the stale run rendered is rendered again from it.
    _reconcile(kube.get("llmservice", name), memo)
    status = kube.get("llmservice", name)["status"]
    assert status["tuning"]["maxBatchSize"] == shrunk
    (rendered,) = kube.get("configmap", f"{name}-config")["data"].values()
    assert yaml.safe_load(rendered)["batching"]["maxBatchSize"] == shrunk
    assert [d["action"] for d in status["decisions"]] == ["batch_shrink"]


def test_rendered_statuses_come_back_from_the_api_server_unpruned(
    kube: Any, make_example: Any, llmservice_crd: object
) -> None:
    name = kube.new_name("prune")
    kube.apply(make_example(name))
    ctx = _context(kube)
    measured = window.unavailable("", now_s=NOW.timestamp(), quantile=0.95, num_pods_expected=1)
    svc = models.load_stored(reconcile.plain_body(kube.get("llmservice", name)))
    written = {
        "observed": status_models.status_json(bridge.observed_status(measured, percentile=95.0, now=NOW)),
        "tuning": status_models.status_json(models.initial_tuning(svc.spec)),
        "decisions": [status_models.status_json(_record("advise:scale_up,batch_shrink", 3))],
    }
    assert crd_schema.errors(crd_schema.status_validator(), written) == []
    assert ctx.applier.patch_llmservice_status(name, kube.namespace, written)
    stored = kube.get("llmservice", name)["status"]
    assert {key: stored[key] for key in written} == written  # nothing pruned, nothing refused


class _RunsBetweenWrites(apply.Applier):
    """An applier that runs `between()` once, right after the first write the tick makes through it."""

    def __init__(self, api_client: Any, between: Any) -> None:
        super().__init__(api_client)
        self._between = between

    def _after_write(self) -> None:
        between, self._between = self._between, None
        if between is not None:
            between()

    def patch_llmservice_status(self, *args: Any, **kwargs: Any) -> bool:
        written = super().patch_llmservice_status(*args, **kwargs)
        self._after_write()
        return written

    def apply(self, *args: Any, **kwargs: Any) -> Any:
        applied = super().apply(*args, **kwargs)
        self._after_write()
        return applied


def test_a_reconcile_landing_inside_a_tuning_change_never_leaves_a_stale_configmap(
    kube: Any, make_example: Any, llmservice_crd: object
) -> None:
    """The spec handler read its copy before a tick changed the batch limits, and applies the ConfigMap it
    rendered from it in the middle of that tick's writes. Whatever lands last, the ConfigMap ends with the
    limits status.tuning holds (the tick writes status.tuning before its ConfigMap, so the handler's
    re-read after its apply sees the change and reconciles again)."""
    name, memo = _autotuned_service(kube, make_example, "cm")
    ctx = context.get(memo)
    _reconcile(kube.get("llmservice", name), memo)
    stale = kube.get("llmservice", name)
    svc = models.load_stored(reconcile.plain_body(stale))
    shrunk = reconcile.current_tuning(svc).model_copy(update={"max_batch_size": svc.spec.batching.max_batch_size // 2})
    outcomes: list[str] = []

    def stale_reconcile() -> None:
        try:
            _reconcile(stale, memo)
            outcomes.append("applied")
        except kopf.TemporaryError:
            outcomes.append("retry")

    tick_ctx = dataclasses.replace(ctx, applier=_RunsBetweenWrites(ctx.api_client, stale_reconcile))
    tune.apply_tuning_change(kopf.Body(stale), svc, shrunk, ctx=tick_ctx)
    assert outcomes == ["retry"]  # the handler saw the tuning move under it
    _reconcile(kube.get("llmservice", name), memo)  # kopf's retry, with the fresh object
    status = kube.get("llmservice", name)["status"]
    assert status["tuning"]["maxBatchSize"] == shrunk.max_batch_size
    (rendered,) = kube.get("configmap", f"{name}-config")["data"].values()
    assert yaml.safe_load(rendered)["batching"]["maxBatchSize"] == shrunk.max_batch_size
