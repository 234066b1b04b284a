"""The engine's cost curve, fitted from what the fleet shows: mean TPOT against the running batch per pod.

The replica rule moves load between fleet sizes with one engine constant, the half-cost batch h: a step
costs a fixed part plus a per-sequence part, TPOT(b) = t0 (1 + b/h), so per-pod concurrency on N pods
solves c = q (1 + c/h). That h differs by an order of magnitude between engines: ~35-50 for a
memory-bound GPU decode, under 10 for a small model on CPU whose prompts' prefill shares the steps
(each prompt token costs about what a decode row costs, so the per-sequence part is large). A wrong h is
not a small error near saturation, where c = q / (1 - q/h) is steep: the "work" the rule carries from
one fleet size to another stops being invariant, so a projection onto one pod fewer reads low (the fleet
steps down past what it needs) and the work measured on an overloaded fleet reads high (the scale-up
overshoots), and the two feed a limit cycle.

So h is measured. Along the operating curve, with prefill chunks riding in the same steps, mean TPOT
is linear in the time-averaged batch: TPOT = t0 + s b, h = t0 / s. Each complete window with enough
requests adds one point (b from Little's law per pod, finishes x mean service time, which is the batch
the TPOT was measured at; the instantaneous running gauge swings too much per scrape), weighed down
exponentially with age, and the line is a weighted least-squares fit of those points. It is used once it
rests on enough windows and its slope stands clear of its standard error, i.e. the batch varied enough
to see the slope; until then the spec's `batch_half_cost_seqs` stands. Pure: no clock, no I/O.
"""

from __future__ import annotations

import dataclasses
import math

from fleetlm_operator.policy import spec as spec_mod
from fleetlm_operator.policy import state as state_mod
from fleetlm_operator.policy import window as window_mod

# Bounds on the fitted h (sequences): below 1 the fixed part of a step is lost in the noise; above this
# the per-sequence part is and the projection is the infinite-server one either way.
MIN_HALF_COST_SEQS = 1.0
MAX_HALF_COST_SEQS = 4096.0


@dataclasses.dataclass(frozen=True, slots=True)
class Fit:
    """TPOT = tpot0_s + slope_s x batch, fitted over about `windows` recent windows."""

    tpot0_s: float
    slope_s: float
    half_cost_seqs: float
    windows: float
    slope_rel_error: float  # standard error / slope

    def describe(self) -> str:
        return (
            f"engine: mean TPOT {self.tpot0_s * 1e3:.2f}ms + {self.slope_s * 1e3:.4f}ms x batch over ~"
            f"{self.windows:.0f} windows (slope +-{self.slope_rel_error:.0%}): half-cost batch "
            f"{self.half_cost_seqs:.1f} seqs"
        )


def batch_point(window: window_mod.ObservedWindow, *, tuning: spec_mod.Tuning) -> tuple[float, float] | None:
    """(time-averaged running batch per pod, mean TPOT) of this window; None when it cannot say.

    Only complete windows with enough requests: a pod without a baseline or a handful of requests
    would put a biased point on the line.
    """
    batch, tpot_s = window.mean_running_per_pod, window.tpot_mean_s
    if not window.complete or batch is None or tpot_s is None or batch <= 0 or tpot_s <= 0:
        return None
    if window.num_requests < tuning.min_requests_for_latency:
        return None
    return batch, tpot_s


def observe(
    sums: state_mod.CostSums, window: window_mod.ObservedWindow, *, tuning: spec_mod.Tuning, now: float
) -> state_mod.CostSums:
    """The sums with this window's point added (older points decayed); unchanged when it has none."""
    point = batch_point(window, tuning=tuning)
    if point is None:
        return sums
    batch, tpot_s = point
    age_s = 0.0 if sums.updated_s is None else max(0.0, now - sums.updated_s)
    decay = 0.5 ** (age_s / tuning.cost_fit_half_life_s)
    weight = decay * sums.weight + 1.0
    # Weighted Welford update with a new point of weight 1 on the decayed moments.
    d_batch = batch - sums.mean_batch
    d_tpot = tpot_s - sums.mean_tpot_s
    mean_batch = sums.mean_batch + d_batch / weight
    mean_tpot_s = sums.mean_tpot_s + d_tpot / weight
    return state_mod.CostSums(
        weight=weight,
        mean_batch=mean_batch,
        mean_tpot_s=mean_tpot_s,
        ss_batch=decay * sums.ss_batch + d_batch * (batch - mean_batch),
        sp_batch_tpot=decay * sums.sp_batch_tpot + d_batch * (tpot_s - mean_tpot_s),
        ss_tpot=decay * sums.ss_tpot + d_tpot * (tpot_s - mean_tpot_s),
        updated_s=now,
    )


def fit(sums: state_mod.CostSums, *, tuning: spec_mod.Tuning) -> Fit | None:
    """The fitted line, or None while it is not to be trusted (too few windows, too little spread)."""
    if sums.weight < tuning.cost_fit_min_windows or sums.ss_batch <= 0:
        return None
    slope = sums.sp_batch_tpot / sums.ss_batch
    if slope <= 0:
        return None  # no measurable per-sequence cost: keep the prior
    residual = max(0.0, sums.ss_tpot - slope * sums.sp_batch_tpot)
    stderr = math.sqrt(residual / (sums.weight - 2.0) / sums.ss_batch)
    if slope < tuning.cost_fit_z * stderr:
        return None
    tpot0 = sums.mean_tpot_s - slope * sums.mean_batch
    # A fixed part at or below zero is a fixed part too small to see: the smallest h.
    half = min(MAX_HALF_COST_SEQS, max(MIN_HALF_COST_SEQS, tpot0 / slope))
    return Fit(
        tpot0_s=tpot0,
        slope_s=slope,
        half_cost_seqs=half,
        windows=sums.weight,
        slope_rel_error=stderr / slope,
    )


def calibrated(tuning: spec_mod.Tuning, fitted: Fit | None) -> spec_mod.Tuning:
    """The tuning with the fitted h in place of the prior (unchanged without a trusted fit)."""
    if fitted is None:
        return tuning
    return dataclasses.replace(tuning, batch_half_cost_seqs=fitted.half_cost_seqs)
