"""The tuner's memory between ticks, kept as plain JSON so it survives operator restarts.

`TunerState` holds what the anti-flap rules need from the past: recent replica recommendations (for the
stabilization windows), the batch limits in force and when they last moved, the classes being shed and
since when shedding could end, and the running moments of the engine's observed cost curve (TPOT
against the running batch, see `costcurve`). The handler stores `to_json()` in an annotation or in
status and hands `from_json()` back on the next tick, on this operator or its successor. Timestamps are
wall-clock epoch seconds (the `now` the handler passes), so they keep their meaning across restarts.
This module decides nothing and does no I/O.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from fleetlm_operator.policy import startup as startup_mod

SCHEMA_VERSION = 1
MAX_RECOMMENDATIONS = 256  # bounds the annotation; 64 minutes of 15 s ticks


@dataclasses.dataclass(frozen=True, slots=True)
class Recommendation:
    """What one tick's data asked for, before stabilization.

    `work`: the fleet's load in batch slots with the batch-size slowdown taken out (independent of how
    many replicas carried it); None on a tick whose data could not justify a scale-down (incomplete
    metrics, starting pods, a queue, no latency headroom), which then blocks scale-down for a window.
    """

    at_s: float
    replicas: int
    work: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class CostSums:
    """Exponentially weighted moments of (running batch per pod, mean TPOT) over past windows.

    Centred moments (a weighted Welford update) rather than raw sums: TPOT is ~1e-3 s and the batch
    ~1e2, so raw sums of squares would cancel badly. `costcurve` updates and fits them; this is data.
    """

    weight: float = 0.0  # sum of the decayed weights (about the number of recent windows)
    mean_batch: float = 0.0
    mean_tpot_s: float = 0.0
    ss_batch: float = 0.0  # weighted sum of squared deviations of the batch
    sp_batch_tpot: float = 0.0  # ... of the batch x TPOT cross products
    ss_tpot: float = 0.0
    updated_s: float | None = None  # when the last window was added (for the decay)

    def to_list(self) -> list[float | None]:
        return [
            self.weight, self.mean_batch, self.mean_tpot_s, self.ss_batch, self.sp_batch_tpot, self.ss_tpot,
            self.updated_s,
        ]  # fmt: skip

    @classmethod
    def from_list(cls, row: Any) -> CostSums:
        if not isinstance(row, list | tuple) or len(row) != 7:
            raise ValueError(f"cost curve sums must be a list of 7 numbers, got {row!r}")
        weight, mean_batch, mean_tpot_s, ss_batch, sp_batch_tpot, ss_tpot = (float(v) for v in row[:6])
        return cls(weight, mean_batch, mean_tpot_s, ss_batch, sp_batch_tpot, ss_tpot, updated_s=_opt_float(row[6]))


@dataclasses.dataclass(frozen=True, slots=True)
class Surge:
    """The latest scale-up and the fleet size before the run of scale-ups it belongs to.

    Pods a scale-up added for demand that has since gone (a burst) may be given back before the
    scale-down stabilization window has passed, down to `base` at most (see `replicas`).
    """

    at_s: float  # when the latest scale-up of the run was decided
    base: int  # the replicas before the run's first scale-up
    work: float  # the work (batch slots, slowdown taken out) that asked for the latest scale-up

    def to_list(self) -> list[float]:
        return [self.at_s, self.base, self.work]

    @classmethod
    def from_list(cls, row: Any) -> Surge:
        if not isinstance(row, list | tuple) or len(row) != 3:
            raise ValueError(f"surge must be a list [atS, base, work], got {row!r}")
        return cls(at_s=float(row[0]), base=int(row[1]), work=float(row[2]))


@dataclasses.dataclass(frozen=True, slots=True)
class TunerState:
    recommendations: tuple[Recommendation, ...] = ()
    history_start_s: float | None = None  # first tick this state has seen: stabilization needs a full window
    max_batch_size: int | None = None  # None: the spec's initial value
    max_batch_tokens: int | None = None
    batch_changed_s: float | None = None
    batch_direction: int = 0  # +1 grew, -1 shrank, 0 never moved
    shed_classes: tuple[str, ...] = ()  # in the order they were shed
    shed_changed_s: float | None = None
    unshed_clear_since_s: float | None = None  # since when unshedding has been justified
    last_replicas: int | None = None  # what the last decision asked for
    last_scale_s: float | None = None
    surge: Surge | None = None  # the latest run of scale-ups, while its pods may still be given back early
    updated_s: float | None = None
    cost: CostSums = CostSums()  # the engine's TPOT-vs-batch observations, for the fitted cost curve
    startup: startup_mod.StartupStats = dataclasses.field(default_factory=startup_mod.StartupStats)  # learnt start-up
    queue_limits: Mapping[str, int] = dataclasses.field(default_factory=dict)  # per class, in force (`queuebound`)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": SCHEMA_VERSION,
            "recommendations": [[r.at_s, r.replicas, r.work] for r in self.recommendations],
            "historyStartS": self.history_start_s,
            "maxBatchSize": self.max_batch_size,
            "maxBatchTokens": self.max_batch_tokens,
            "batchChangedS": self.batch_changed_s,
            "batchDirection": self.batch_direction,
            "shedClasses": list(self.shed_classes),
            "shedChangedS": self.shed_changed_s,
            "unshedClearSinceS": self.unshed_clear_since_s,
            "lastReplicas": self.last_replicas,
            "lastScaleS": self.last_scale_s,
            "surge": None if self.surge is None else self.surge.to_list(),
            "updatedS": self.updated_s,
            "costCurve": self.cost.to_list(),
            "startup": self.startup.to_dict(),
            "queueLimits": dict(self.queue_limits),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TunerState:
        """Read a stored state. Raises ValueError for a newer schema or malformed values.

        Missing keys take their defaults, so a state written by an older operator still loads.
        """
        version = data.get("version", SCHEMA_VERSION)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise ValueError(f"tuner state version {version!r} is newer than {SCHEMA_VERSION}")
        try:
            recommendations = tuple(
                Recommendation(
                    at_s=float(row[0]), replicas=int(row[1]), work=_opt_float(row[2]) if len(row) > 2 else None
                )
                for row in data.get("recommendations", [])
            )
            return cls(
                recommendations=recommendations[-MAX_RECOMMENDATIONS:],
                history_start_s=_opt_float(data.get("historyStartS")),
                max_batch_size=_opt_int(data.get("maxBatchSize")),
                max_batch_tokens=_opt_int(data.get("maxBatchTokens")),
                batch_changed_s=_opt_float(data.get("batchChangedS")),
                batch_direction=int(data.get("batchDirection", 0)),
                shed_classes=tuple(str(name) for name in data.get("shedClasses", [])),
                shed_changed_s=_opt_float(data.get("shedChangedS")),
                unshed_clear_since_s=_opt_float(data.get("unshedClearSinceS")),
                last_replicas=_opt_int(data.get("lastReplicas")),
                last_scale_s=_opt_float(data.get("lastScaleS")),
                surge=Surge.from_list(data["surge"]) if data.get("surge") is not None else None,
                updated_s=_opt_float(data.get("updatedS")),
                cost=CostSums.from_list(data["costCurve"]) if data.get("costCurve") is not None else CostSums(),
                startup=(
                    startup_mod.StartupStats.from_dict(data["startup"])
                    if data.get("startup") is not None
                    else startup_mod.StartupStats()
                ),
                queue_limits={str(k): int(v) for k, v in dict(data.get("queueLimits") or {}).items()},
            )
        except (TypeError, ValueError) as error:
            raise ValueError(f"malformed tuner state: {error}") from error

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TunerState:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("tuner state must be a JSON object")
        return cls.from_dict(data)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)
