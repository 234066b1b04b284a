"""The admission rule (`qos.admit`) as a table: the operator's shed classes first, then the global and
per-class queue bounds, then SLO pressure, which refuses sheddable classes only, as soon as a protected
class's queueing delay or recent TTFT reaches the configured fraction of its target, and never a class
that is not sheddable. A shed evicts the class's waiting requests too, and a full queue displaces the
newest request of a lower class rather than refuse a higher one. `fifo` keeps only the global bound.
`RecentTTFT` is the windowed, bounded input."""

from __future__ import annotations

from typing import Any

import pytest

from fleetlm_runtime import config, contract, qos

CLASSES = [
    {"name": "critical", "priority": 0, "ttftTargetS": 1.0},
    {"name": "standard", "priority": 1, "queueLimit": 5, "ttftTargetS": 4.0},
    {"name": "sheddable", "priority": 2, "sheddable": True, "queueLimit": 20},
    {"name": "bulk", "priority": 3, "sheddable": True},
]
MAX_QUEUE = 40


def _qos(**overrides: Any) -> config.QoSSettings:
    data: dict[str, Any] = {"classes": CLASSES, "defaultClass": "standard", **overrides}
    return config.parse_config({"qos": data}).qos


def _load(**by_class: tuple[int, float, float | None]) -> dict[str, qos.ClassLoad]:
    """class=(num_waiting, oldest_wait_s, recent_ttft_s)."""
    return {
        name: qos.ClassLoad(num_waiting=w, oldest_wait_s=o, recent_ttft_s=t) for name, (w, o, t) in by_class.items()
    }


IDLE: dict[str, tuple[int, float, float | None]] = {}

CASES = [
    # (name, class, load, qos overrides, expected code or None for admitted)
    ("idle: all admitted", "sheddable", IDLE, {}, None),
    ("idle: critical", "critical", IDLE, {}, None),
    ("critical waits 0.49 s of 1 s: below half", "sheddable", {"critical": (1, 0.49, None)}, {}, None),
    ("critical waits 0.5 s of 1 s: shed", "sheddable", {"critical": (1, 0.5, None)}, {}, contract.CODE_SLO_SHED),
    ("recent critical TTFT p90 at 0.6 s: shed", "bulk", {"critical": (0, 0.0, 0.6)}, {}, contract.CODE_SLO_SHED),
    ("standard at half its 4 s target: shed", "sheddable", {"standard": (2, 2.1, None)}, {}, contract.CODE_SLO_SHED),
    ("pressure never sheds a protected class", "standard", {"critical": (1, 5.0, 9.0)}, {}, None),
    ("pressure never sheds critical itself", "critical", {"critical": (3, 5.0, 9.0)}, {}, None),
    ("a sheddable class's own wait is no pressure", "bulk", {"sheddable": (10, 30.0, 30.0)}, {}, None),
    ("custom fraction 0.8: 0.7 s is fine", "sheddable", {"critical": (1, 0.7, None)},
     {"shedding": {"ttftFraction": 0.8}}, None),
    ("custom fraction 0.8: 0.8 s sheds", "sheddable", {"critical": (1, 0.8, None)},
     {"shedding": {"ttftFraction": 0.8}}, contract.CODE_SLO_SHED),
    ("shedding disabled: pressure ignored", "sheddable", {"critical": (1, 5.0, None)},
     {"shedding": {"enabled": False}}, None),
    ("half the queue full: sheddable shed", "bulk", {"standard": (5, 0.1, None), "critical": (15, 0.1, None)}, {},
     contract.CODE_SLO_SHED),
    ("half the queue full: standard still queues", "standard", {"standard": (4, 0.1, None),
     "critical": (16, 0.1, None)}, {}, None),
    ("class queue limit", "standard", {"standard": (5, 0.0, None)}, {}, contract.CODE_QUEUE_FULL),
    ("class queue limit of a sheddable class", "sheddable", {"sheddable": (20, 0.0, None)},
     {"shedding": {"queueFraction": 1.0}}, contract.CODE_QUEUE_FULL),
    ("global bound refuses the lowest class", "bulk", {"standard": (5, 0.0, None), "sheddable": (20, 0.0, None),
     "bulk": (15, 0.0, None)}, {}, contract.CODE_QUEUE_FULL),
    ("global bound: critical displaces a lower one", "critical", {"standard": (5, 0.0, None),
     "sheddable": (20, 0.0, None), "bulk": (15, 0.0, None)}, {}, None),
    ("global bound full of critical refuses critical", "critical", {"critical": (40, 0.0, None)},
     {"shedding": {"ttftFraction": 1.0}}, contract.CODE_QUEUE_FULL),
    ("operator's shed list, idle", "bulk", IDLE, {"shedClasses": ["bulk"]}, contract.CODE_CLASS_SHED),
    ("operator's shed list spares others", "sheddable", IDLE, {"shedClasses": ["bulk"]}, None),
    ("fifo: class limits ignored", "standard", {"standard": (5, 0.0, None)}, {"policy": "fifo"}, None),
    ("fifo: pressure ignored", "sheddable", {"critical": (1, 5.0, 5.0)}, {"policy": "fifo"}, None),
    ("fifo: shed list ignored", "bulk", IDLE, {"policy": "fifo", "shedClasses": ["bulk"]}, None),
    ("fifo: the global bound holds", "critical", {"standard": (40, 0.0, None)}, {"policy": "fifo"},
     contract.CODE_QUEUE_FULL),
]  # fmt: skip


@pytest.mark.parametrize(
    ("qos_class", "load", "overrides", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_admission_table(
    qos_class: str, load: dict[str, tuple[int, float, float | None]], overrides: dict[str, Any], expected: str | None
) -> None:
    verdict = qos.admit(qos_class, qos=_qos(**overrides), max_queue_len=MAX_QUEUE, load=_load(**load))
    assert verdict.admit is (expected is None), verdict
    assert verdict.code == expected
    if expected is not None:
        assert qos_class in verdict.message or "queue" in verdict.message


EVICTIONS = [
    # (name, class, load, qos overrides, expected eviction as (class, count, code) or None)
    ("a full queue displaces the newest of the lowest class", "critical",
     {"standard": (5, 0.0, None), "sheddable": (20, 0.0, None), "bulk": (15, 0.0, None)}, {},
     ("bulk", 1, contract.CODE_QUEUE_FULL)),
    ("standard displaces sheddable, never critical", "standard",
     {"critical": (30, 0.0, None), "sheddable": (10, 0.0, None)}, {}, ("sheddable", 1, contract.CODE_QUEUE_FULL)),
    ("nothing lower waits: no displacement", "standard", {"critical": (35, 0.0, None), "standard": (5, 0.0, None)},
     {}, None),
    ("fifo never displaces", "critical", {"bulk": (40, 0.0, None)}, {"policy": "fifo"}, None),
    ("the tuner's shed: that class's waiting requests go too", "bulk", {"bulk": (3, 9.0, None)},
     {"shedClasses": ["bulk"]}, ("bulk", None, contract.CODE_CLASS_SHED)),
    ("the SLO guard's shed: that class's waiting requests go too", "sheddable",
     {"critical": (1, 0.5, None), "sheddable": (4, 2.0, None)}, {}, ("sheddable", None, contract.CODE_SLO_SHED)),
    ("a shed with none of that class waiting evicts nothing", "sheddable", {"critical": (1, 0.5, None)}, {}, None),
    ("a class's own queue limit refuses without evicting", "standard", {"standard": (5, 0.0, None)}, {}, None),
    ("no shed, no eviction", "sheddable", {"sheddable": (4, 2.0, None)}, {}, None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("qos_class", "load", "overrides", "expected"), [c[1:] for c in EVICTIONS], ids=[c[0] for c in EVICTIONS]
)
def test_evictions_go_with_sheds_and_full_queues(
    qos_class: str,
    load: dict[str, tuple[int, float, float | None]],
    overrides: dict[str, Any],
    expected: tuple[str, int | None, str] | None,
) -> None:
    verdict = qos.admit(qos_class, qos=_qos(**overrides), max_queue_len=MAX_QUEUE, load=_load(**load))
    evict = verdict.evict
    assert (evict.qos_class, evict.count, evict.code) == expected if evict else expected is None, verdict
    if evict is not None and evict.count == 1:
        assert verdict.admit and f"displaced by a request of class {qos_class!r}" in evict.message


def test_sheddable_goes_before_any_protected_class_misses_its_target() -> None:
    """Sweep a protected class's delay from 0 to its target: sheddable requests are refused from half the
    target on, and at every point the protected classes themselves are admitted."""
    settings = _qos()
    for step in range(21):
        delay = step * 0.05  # up to critical's 1 s target
        load = _load(critical=(1, delay, None))
        shed = not qos.admit("sheddable", qos=settings, max_queue_len=MAX_QUEUE, load=load).admit
        assert shed is (delay >= 0.5), delay
        for protected in ("critical", "standard"):
            assert qos.admit(protected, qos=settings, max_queue_len=MAX_QUEUE, load=load).admit


def test_shed_classes_must_be_known_and_sheddable() -> None:
    with pytest.raises(config.ConfigError, match="not sheddable"):
        _qos(shedClasses=["critical"])
    with pytest.raises(config.ConfigError, match="unknown"):
        _qos(shedClasses=["gold"])
    assert _qos(shedClasses=["bulk", "sheddable"]).shed_classes == ["bulk", "sheddable"]


def test_recent_ttft_is_a_windowed_high_quantile_with_bounded_memory() -> None:
    recent = qos.RecentTTFT(max_samples=50)
    assert recent.quantile("c", now_s=0.0, window_s=10.0) is None
    for i in range(10):
        recent.observe("c", now_s=100.0 + i, ttft_s=0.1 * (i + 1))  # 0.1 .. 1.0
    assert recent.quantile("c", now_s=109.0, window_s=100.0) == pytest.approx(0.9)  # p90, nearest rank
    assert recent.quantile("c", now_s=109.0, window_s=100.0, q=1.0) == pytest.approx(1.0)
    # Only the last 3 s: samples at 106..109 -> 0.7 .. 1.0.
    assert recent.quantile("c", now_s=109.0, window_s=3.0, q=0.0 + 1e-9) == pytest.approx(0.7)
    assert recent.quantile("c", now_s=200.0, window_s=10.0) is None  # all too old: no data, not zero
    for i in range(500):
        recent.observe("d", now_s=float(i), ttft_s=1.0)
    assert len(recent._samples["d"]) == 50
