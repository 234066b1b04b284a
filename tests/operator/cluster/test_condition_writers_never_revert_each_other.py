"""status.conditions against the real API server: the rollout refresh and the tuner each server-side apply
their own condition types (one field manager each, the list a map keyed by `type`), so two writers racing
with stale reads never lose each other's newest condition, and a late "not known yet" placeholder never
reverts a value the tuner wrote.

Each round both writers read the object, wait for each other (so each read is stale by the other's write),
then write a new value of their own condition through the handlers' own functions; after every round both
values of that round must be there. A merge patch of the whole list read before the other's write (what the
handlers did before) reverts one of them in every round.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import threading
from typing import Any

import pytest
from kubernetes import config

from fleetlm_operator import settings
from fleetlm_operator.act import apply
from fleetlm_operator.handlers import context, reconcile, tune
from fleetlm_operator.status import conditions

pytestmark = pytest.mark.cluster

ROUNDS = 12


def _conditions(kube: Any, name: str) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (kube.get("llmservice", name).get("status") or {}).get("conditions", [])}


def _context(kube: Any) -> context.OperatorContext:
    api_client = config.new_client_from_config(config_file=str(kube.plane.kubeconfig))
    return context.OperatorContext(settings=settings.OperatorSettings(), api_client=api_client,
                                   applier=apply.Applier(api_client))  # fmt: skip


def test_rollout_and_tuner_writers_racing_keep_both_conditions(
    kube: Any, make_example: Any, llmservice_crd: object
) -> None:
    name = kube.new_name("conds")
    kube.apply(make_example(name))
    ctx = _context(kube)
    # Three parties: the two writers and this thread, which checks each round once both have written.
    rounds = threading.Barrier(3, timeout=60)
    errors: list[BaseException] = []

    def rollout_write(stale: dict[str, Any], index: int) -> None:
        ready = conditions.Condition("Ready", "True" if index % 2 else "False", "Round", f"rollout {index}")
        progressing = conditions.Condition("Progressing", "False", "Round", f"rollout {index}")
        owned = conditions.for_apply((stale.get("status") or {}).get("conditions", []), [ready, progressing],
                                     owned={"Ready", "Progressing"}, now=datetime.datetime.now(datetime.UTC),
                                     observed_generation=1)  # fmt: skip
        # The handlers' own path; on the first round it also races the tuner with its placeholders.
        reconcile.apply_conditions(stale, owned, ctx=ctx, only_if_changed=False)

    def tuner_write(stale: dict[str, Any], index: int) -> None:
        slo = conditions.Condition("SLOMet", "True" if index % 2 else "False", "Round", f"tuner {index}")
        available = conditions.Condition("MetricsAvailable", "True", "Round", f"tuner {index}")
        asyncio.run(tune._apply_conditions(stale, [slo, available], ctx=ctx, now_s=1000.0 + index))

    def writer(write: Any) -> None:
        try:
            for index in range(ROUNDS):
                stale = kube.get("llmservice", name)
                rounds.wait()  # both have read: each write now lands on a list the other one changes
                write(stale, index)
                rounds.wait()  # written; the checker reads
                rounds.wait()  # checked
        except BaseException as error:  # reported by the test thread
            errors.append(error)
            rounds.abort()

    threads = [threading.Thread(target=writer, args=(w,), daemon=True) for w in (rollout_write, tuner_write)]
    for thread in threads:
        thread.start()
    try:
        for index in range(ROUNDS):
            rounds.wait()
            rounds.wait()
            found = _conditions(kube, name)
            assert found["Ready"]["message"] == f"rollout {index}", found
            assert found["Progressing"]["message"] == f"rollout {index}", found
            assert found["SLOMet"]["message"] == f"tuner {index}", found
            assert found["MetricsAvailable"]["message"] == f"tuner {index}", found
            assert found["SLOMet"]["status"] == ("True" if index % 2 else "False")
            rounds.wait()
    except threading.BrokenBarrierError:
        pytest.fail(f"a writer failed: {errors!r}")
    finally:
        for thread in threads:
            thread.join(timeout=60)
    assert not errors, errors

    # A late placeholder (a refresh that read the object before the tuner's first write) never reverts the
    # tuner's value: it is applied unforced and conflicts.
    fresh = kube.get("llmservice", name)
    before = (fresh.get("status") or {})["conditions"]
    stale = {**fresh, "status": {"conditions": [c for c in before if c["type"] not in conditions.TUNER_TYPES]}}
    reconcile.apply_conditions(stale, [c for c in before if c["type"] in {"Ready", "Progressing"}], ctx=ctx,
                               only_if_changed=False)  # fmt: skip
    found = _conditions(kube, name)
    assert found["SLOMet"]["message"] == f"tuner {ROUNDS - 1}", found
    # Each writer owns its own entries (the API server's managedFields say who wrote what).
    shown = json.loads(kube.plane.kubectl("get", "llmservice", name, "-n", kube.namespace, "-o", "json",
                                          "--show-managed-fields").stdout)  # fmt: skip
    managers = {entry["manager"] for entry in shown["metadata"]["managedFields"]
                if entry.get("subresource") == "status" and entry.get("operation") == "Apply"}  # fmt: skip
    assert {conditions.ROLLOUT_WRITER, conditions.TUNER_WRITER} <= managers, managers
