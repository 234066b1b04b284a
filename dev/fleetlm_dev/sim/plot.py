"""Draw one trace's runs as a PNG: offered load, replicas (each policy and the oracle), TTFT and TPOT
at the SLO percentile per interval against their targets, and per-interval SLO attainment.

Uses matplotlib's Agg backend (no display) and writes only the file it is given. Decides nothing.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # (after choosing the backend)
import numpy as np

from fleetlm_dev.sim import run

_COLOURS = {"fleetlm": "tab:blue", "hpa": "tab:orange"}


def draw(outcomes: Sequence[run.Outcome], path: pathlib.Path) -> pathlib.Path:
    """One PNG for runs of the same trace (one line per policy)."""
    if not outcomes:
        raise ValueError("nothing to draw")
    first = outcomes[0]
    fig, axes = plt.subplots(5, 1, figsize=(11, 13), sharex=True, constrained_layout=True)
    load_ax, replica_ax, ttft_ax, tpot_ax, att_ax = axes
    t_min = np.array([tick.t_s for tick in first.ticks]) / 60.0
    load_ax.plot(t_min, [tick.offered_per_s for tick in first.ticks], color="black")
    load_ax.set_ylabel("offered req/s")
    load_ax.set_title(f"trace {first.trace}: load, replicas and latency per {first.interval_s:g}s interval")

    replica_ax.step(
        t_min, [tick.oracle for tick in first.ticks], where="post", color="grey", linestyle="--", label="oracle"
    )
    for outcome in outcomes:
        colour = _COLOURS.get(outcome.policy)
        style = ":" if outcome.router else "-"  # the router's run of a policy: its colour, dotted
        ticks_min = np.array([tick.t_s for tick in outcome.ticks]) / 60.0
        replica_ax.step(
            ticks_min,
            [tick.replicas for tick in outcome.ticks],
            where="post",
            color=colour,
            linestyle=style,
            label=f"{outcome.variant} ({outcome.cost_ratio:.2f}x oracle)",
        )
        interval_min = outcome.interval_t_s / 60.0
        ttft_ax.plot(interval_min, outcome.interval_ttft_s, color=colour, linestyle=style, label=outcome.variant)
        tpot_ax.plot(interval_min, outcome.interval_tpot_s, color=colour, linestyle=style, label=outcome.variant)
        att_ax.plot(
            interval_min,
            outcome.interval_attainment,
            color=colour,
            linestyle=style,
            label=f"{outcome.variant} ({outcome.attainment:.1%} overall)",
        )
    replica_ax.set_ylabel("replicas")
    replica_ax.legend(loc="upper left", fontsize=8)

    pct = f"p{first.percentile:g}"
    for ax, target, label in (
        (ttft_ax, first.ttft_target_s, f"TTFT {pct} (s)"),
        (tpot_ax, first.tpot_target_s, f"TPOT {pct} (s)"),
    ):
        if target is not None:
            ax.axhline(target, color="red", linestyle=":", label="target")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.legend(loc="upper left", fontsize=8)
    att_ax.axhline(first.attainment_target, color="red", linestyle=":", label="target")
    att_ax.set_ylim(0.0, 1.02)
    att_ax.set_ylabel("SLO attainment")
    att_ax.set_xlabel("minutes (intervals by request arrival)")
    att_ax.legend(loc="lower left", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
