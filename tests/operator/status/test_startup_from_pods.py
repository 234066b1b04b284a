"""The tuner reads start-up from the pods as the API server returns them: creation -> Ready of the ready ones
(restarted and deleting pods left out), the ages of those still loading, and status.startup from a decision."""

from __future__ import annotations

import datetime
from typing import Any

from fleetlm_operator import bridge
from fleetlm_operator.api import status_models
from fleetlm_operator.policy import decide, state, window
from fleetlm_operator.policy import spec as spec_mod

NOW_S = 1_700_000_600.0  # 2023-11-14T22:23:20Z


def _ts(epoch_s: float) -> str:
    return datetime.datetime.fromtimestamp(epoch_s, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pod(name: str, *, created_s: float, ready_s: float | None = None, restarts: int = 0,
         deleting: bool = False) -> dict[str, Any]:  # fmt: skip
    conditions = [{"type": "Ready", "status": "False", "lastTransitionTime": _ts(created_s)}]
    if ready_s is not None:
        conditions = [{"type": "Ready", "status": "True", "lastTransitionTime": _ts(ready_s)}]
    metadata: dict[str, Any] = {"name": name, "creationTimestamp": _ts(created_s)}
    if deleting:
        metadata["deletionTimestamp"] = _ts(NOW_S)
    return {
        "metadata": metadata,
        "status": {"conditions": conditions, "containerStatuses": [{"name": "runtime", "restartCount": restarts}]},
    }


def test_ready_pods_give_start_ups_oldest_first_and_loading_pods_their_ages() -> None:
    pods = [
        _pod("late", created_s=NOW_S - 100, ready_s=NOW_S - 10),  # took 90 s
        _pod("early", created_s=NOW_S - 500, ready_s=NOW_S - 440),  # took 60 s
        _pod("loading", created_s=NOW_S - 45),
        _pod("crashed", created_s=NOW_S - 300, ready_s=NOW_S - 20, restarts=2),
        _pod("going", created_s=NOW_S - 50, deleting=True),
    ]
    ages, started = bridge.pod_startups(pods, now_s=NOW_S)
    assert ages == (45.0,)
    assert [(p.pod, p.seconds, p.ready_for_s) for p in started] == [("early", 60.0, 440.0), ("late", 90.0, 10.0)]


def test_a_pod_without_timestamps_is_skipped_not_guessed() -> None:
    pod = {"metadata": {"name": "x"}, "status": {}}
    assert bridge.pod_startups([pod], now_s=NOW_S) == ((), ())


def test_status_startup_shows_the_learnt_time_and_the_loading_pods() -> None:
    spec = spec_mod.PolicySpec(slo=spec_mod.SLOTargets(ttft_s=0.5), max_replicas=8)
    pods = [_pod("a", created_s=NOW_S - 200, ready_s=NOW_S - 140), _pod("b", created_s=NOW_S - 30)]
    ages, started = bridge.pod_startups(pods, now_s=NOW_S)
    decision = decide.decide(
        spec_mod.PolicyInput(spec, current_replicas=2, ready_replicas=1, loading_ages_s=ages, started=started),
        window.unavailable("no pods scraped", now_s=NOW_S, quantile=0.95),
        state.TunerState(),
        now=NOW_S,
    )
    assert status_models.status_json(bridge.startup_status(decision)) == {
        "observedSeconds": 60.0,
        "lastSeconds": 60.0,
        "podsObserved": 1,
        "loadingReplicas": 1,
        "stuckReplicas": 0,
    }
    # Nothing learnt yet: the figures that are unknown stay absent.
    empty = decide.decide(
        spec_mod.PolicyInput(spec, current_replicas=1, ready_replicas=1, loading_ages_s=(), started=()),
        window.unavailable("no pods scraped", now_s=NOW_S, quantile=0.95),
        state.TunerState(),
        now=NOW_S,
    )
    assert status_models.status_json(bridge.startup_status(empty)) == {
        "podsObserved": 0,
        "loadingReplicas": 0,
        "stuckReplicas": 0,
    }
