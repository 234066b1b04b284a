"""`fleetlm-dev simulate`: replay the SLO tuner against simulated replicas and judge the bars of issue #8.

    fleetlm-dev simulate --trace step|startup60|diurnal|bursts|class-mix|all [--policy fleetlm|hpa|all] [--json]
                         [--plot out.png] [--seed N] [--profile gpu|cpu-tiny] [--startup-s S]
                         [--queue-limit N|none] [--routing service|router|both]
                         [--calibrate-from BENCH.json [--model builtin:tiny]]

Every run puts the FleetLM policy beside the plain queue-depth HPA baseline (unless `--policy` picks one) on
the same arrivals, prints a table of outcomes (`recovery`: the intervals from the step until attainment is
back at target for good, i.e. the attainment of the requests sent since stays at target over the rest of the
plateau, `run.recovery_intervals`), then each bar with PASS/FAIL per policy: issue #8's and #14's,
then the tighter ones of issue #18 (marked `#18`). Each policy runs twice (`--routing both`, the default):
behind the plain Service (random spread) and behind FleetLM's router (`spec.router.enabled`: least loaded), as
two scenarios with a column each (`fleetlm`, `fleetlm+router`); a bar holds for the service as it is deployed,
so the `+router` column speaks only for services with the router on. Issue #18 judges them on three profiles:
the default `gpu`, `--profile cpu-tiny`, and one measured on this machine with `fleetlm-dev bench engine
--json > bench.json` then `--calibrate-from bench.json`. Exit status 0 when every bar judged in the run passes
for the FleetLM policy (the baseline is expected to fail some), 1 otherwise, 2 on bad arguments. With `--trace
all` and `--plot out.png`, one PNG per trace (`out-step.png`, ...). A trace may fix its own pod start-up
(`startup60`: 60 s, whatever the profile or `--startup-s` says, which set it for the others). Nothing here
talks to a cluster; it is CPU-only and takes a minute or two per profile (the router doubles the runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

from fleetlm_dev.sim import bars, calibration, oracle, run, workload

POLICY_ORDER = ("fleetlm", "hpa")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetlm-dev simulate", description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default="all", choices=[*workload.TRACES, "all"], help="trace to replay")
    parser.add_argument("--policy", default="all", choices=[*POLICY_ORDER, "all"], help="policy (default: both)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument("--plot", type=pathlib.Path, default=None, help="write a PNG (one per trace with --trace all)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of arrivals and routing")
    parser.add_argument("--profile", default="gpu", choices=sorted(calibration.PROFILES), help="step-time calibration")
    parser.add_argument("--startup-s", type=float, default=None, help="pod start-up delay (default: the profile's)")
    parser.add_argument(
        "--calibrate-from",
        type=pathlib.Path,
        default=None,
        metavar="BENCH.json",
        help="step times measured by `fleetlm-dev bench engine --json` instead of --profile",
    )
    parser.add_argument("--model", default="builtin:tiny", help="which model of --calibrate-from to use")
    parser.add_argument(
        "--routing",
        default="both",
        choices=("service", "router", "both"),
        help="arrivals spread by the Service at random, through the router (least loaded), or both (default)",
    )
    parser.add_argument(
        "--queue-limit",
        default=str(run.FleetOptions().queue_limit),
        help="per-class queue limit per replica (429 past it; the spec's queueLimit, a cap on the bound the "
        "FleetLM tuner sizes in time), or 'none' for no cap",
    )
    return parser


def _queue_limit(text: str) -> int | None:
    if text.lower() in ("none", "unbounded", "0"):
        return None
    value = int(text)
    if value < 1:
        raise ValueError("queue limit must be at least 1")
    return value


def _outcome_json(outcome: run.Outcome) -> dict[str, Any]:
    return {
        "trace": outcome.trace,
        "policy": outcome.policy,
        "router": outcome.router,
        "requests": outcome.num_requests,
        "attainment": round(outcome.attainment, 5),
        "attainmentByClass": {k: round(v, 5) for k, v in outcome.attainment_by_class.items()},
        "shed": dict(outcome.num_shed),
        "failed": outcome.num_failed,
        "replicaMinutes": round(outcome.replica_minutes, 2),
        "oracleReplicaMinutes": round(outcome.oracle_replica_minutes, 2),
        "costRatio": round(outcome.cost_ratio, 4),
        "startupS": outcome.startup_s,
        "replicaChanges": outcome.num_changes,
        "recoveryIntervals": outcome.recovery_intervals,
        "steadyChanges": outcome.steady_changes,
        "engine": _engine_fit(outcome),
    }


def _engine_fit(outcome: run.Outcome) -> str | None:
    """What the policy had learnt of the engine's cost curve by the end of the run (FleetLM only)."""
    last = outcome.ticks[-1].reasons if outcome.ticks else ()
    return next((r for r in last if r.startswith("engine:")), None)


def _table(outcomes: Sequence[run.Outcome]) -> str:
    header = (
        f"{'trace':<10} {'policy':<14} {'requests':>8} {'attain':>7} {'shed':>6} {'failed':>6} "
        f"{'rep-min':>8} {'oracle':>7} {'ratio':>6} {'changes':>7} {'recovery':>8} {'steady':>6}"
    )
    lines = [header, "-" * len(header)]
    for o in outcomes:
        recovery = "-" if o.recovery_intervals is None else str(o.recovery_intervals)
        steady = "-" if o.steady_changes is None else str(o.steady_changes)
        lines.append(
            f"{o.trace:<10} {o.variant:<14} {o.num_requests:>8} {o.attainment:>7.2%} {sum(o.num_shed.values()):>6} "
            f"{o.num_failed:>6} {o.replica_minutes:>8.1f} {o.oracle_replica_minutes:>7.1f} {o.cost_ratio:>5.2f}x "
            f"{o.num_changes:>7} {recovery:>8} {steady:>6}"
        )
    return "\n".join(lines)


def _calibration(parser: argparse.ArgumentParser, args: argparse.Namespace) -> calibration.Calibration:
    """The named profile, or one fitted to an engine benchmark's report; then the start-up override."""
    calib = calibration.PROFILES[args.profile]
    if args.calibrate_from is not None:
        try:
            report = json.loads(args.calibrate_from.read_text())
            calib = calibration.from_engine_benchmark(report, model=args.model)
        except (OSError, ValueError) as error:
            parser.error(f"--calibrate-from: {error}")
    if args.startup_s is not None:
        calib = calib.with_startup(args.startup_s)
    return calib


def _judge(by_trace: dict[str, list[run.Outcome]]) -> tuple[list[dict[str, Any]], bool]:
    """Each trace's tight bars applied to every outcome (a column per policy and routing); whether FleetLM's
    policy passed them all, in every routing run."""
    verdicts: list[dict[str, Any]] = []
    all_pass = True
    for trace_name, outcomes in by_trace.items():
        for bar in bars.bars_for(trace_name, tight=True):
            row: dict[str, Any] = {"bar": bar.key, "description": bar.description}
            for outcome in outcomes:
                verdict = bar.judge(outcome)
                row[outcome.variant] = {"value": verdict.value, "pass": verdict.passed}
                if outcome.policy == "fleetlm" and not verdict.passed:
                    all_pass = False
            verdicts.append(row)
    return verdicts, all_pass


def _document(
    calib: calibration.Calibration,
    *,
    queue_limit: int | None,
    seed: int,
    capacities: dict[str, oracle.Capacity],
    by_trace: dict[str, list[run.Outcome]],
    verdicts: list[dict[str, Any]],
    plots: list[str],
    cpu_s: float,
) -> dict[str, Any]:
    """The `--json` output."""
    return {
        "calibration": {
            "profile": calib.name,
            "description": calib.description,
            "stepTime": {
                "baseS": calib.step.base_s,
                "perSeqS": calib.step.per_seq_s,
                "perTokenS": calib.step.per_token_s,
            },
            "kvCapacityTokens": calib.kv_capacity_tokens,
            "startupS": calib.startup_s,
        },
        "queueLimit": queue_limit,
        "seed": seed,
        "oracle": {
            n: {"ratePerReplica": round(c.rate_per_s, 3), "maxBatchSize": c.max_batch_size}
            for n, c in capacities.items()
        },
        "outcomes": [_outcome_json(o) for outcomes in by_trace.values() for o in outcomes],
        "bars": verdicts,
        "plots": plots,
        "cpuS": round(cpu_s, 1),
    }


def _print_setup(
    calib: calibration.Calibration,
    spec: Any,
    *,
    queue_limit: int | None,
    seed: int,
    capacities: dict[str, oracle.Capacity],
) -> None:
    """What the run assumed: the calibration, the SLO and the oracle's capacity per trace."""
    print(f"calibration: {calib.name} - {calib.description}")
    step = calib.step
    print(
        f"  step_s = {step.base_s:g} + {step.per_seq_s:g} x seqs + {step.per_token_s:g} x tokens; "
        f"KV {calib.kv_capacity_tokens} tokens; start-up {calib.startup_s:g}s; queue limit {queue_limit}; "
        f"seed {seed}"
    )
    slo = spec.slo
    print(
        f"SLO: TTFT {slo.ttft_s}s, TPOT {slo.tpot_s}s at p{slo.percentile:g}, attainment target "
        f"{slo.target_attainment:.0%}; interval {spec.interval_s:g}s, scale-down stabilization "
        f"{spec.scale_down_stabilization_s:g}s"
    )
    for name, capacity in capacities.items():
        print(
            f"oracle ({name}): one replica carries {capacity.rate_per_s:.2f} req/s within the SLO "
            f"(max_batch_size {capacity.max_batch_size})"
        )


def _print_outcomes(by_trace: dict[str, list[run.Outcome]]) -> None:
    """The outcome table, then each outcome's engine fit and, with several classes, attainment by class."""
    print()
    print(_table([o for outcomes in by_trace.values() for o in outcomes]))
    for outcomes in by_trace.values():
        for o in outcomes:
            engine = _engine_fit(o)
            if engine:
                print(f"  {o.trace} {o.variant} {engine}")
    for outcomes in by_trace.values():
        for o in outcomes:
            if len(o.attainment_by_class) > 1:
                per_class = ", ".join(
                    f"{name} {value:.2%} (shed {o.num_shed.get(name, 0)})"
                    for name, value in o.attainment_by_class.items()
                )
                print(f"  {o.trace} {o.variant} by class: {per_class}")


def _print_verdicts(verdicts: list[dict[str, Any]], policy_names: list[str]) -> None:
    """The bars as a table: a row per bar, a column per policy (value and PASS/FAIL)."""
    if not verdicts:
        return
    print()
    width = max(len(v["description"]) for v in verdicts)
    cell_width = max([22, *(len(v[name]["value"]) + 5 for v in verdicts for name in policy_names if name in v)])
    print(f"{'bar':<{width}}  " + "  ".join(f"{p:<{cell_width}}" for p in policy_names))
    for row in verdicts:
        cells = []
        for name in policy_names:
            cell = row.get(name)
            cells.append(
                f"{cell['value'] + ' ' + ('PASS' if cell['pass'] else 'FAIL'):<{cell_width}}"
                if cell
                else f"{'-':<{cell_width}}"
            )
        print(f"{row['description']:<{width}}  " + "  ".join(cells))


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        queue_limit = _queue_limit(args.queue_limit)
    except ValueError as error:
        parser.error(f"--queue-limit: {error}")
    calib = _calibration(parser, args)
    options = run.FleetOptions(queue_limit=queue_limit)
    trace_names = list(workload.TRACES) if args.trace == "all" else [args.trace]
    policy_names = list(POLICY_ORDER) if args.policy == "all" else [args.policy]
    routings = {"service": [False], "router": [True], "both": [False, True]}[args.routing]
    variants = [f"{name}+router" if router else name for router in routings for name in policy_names]

    started = time.process_time()
    by_trace: dict[str, list[run.Outcome]] = {}
    for trace_name in trace_names:
        trace = workload.TRACES[trace_name]
        by_trace[trace_name] = [
            run.simulate(
                trace, run.POLICIES[name], calib=calib, options=dataclasses.replace(options, router=router),
                seed=args.seed,
            )
            for router in routings
            for name in policy_names
        ]  # fmt: skip
    cpu_s = time.process_time() - started

    verdicts, all_pass = _judge(by_trace)

    plots: list[str] = []
    if args.plot is not None:
        from fleetlm_dev.sim import plot  # noqa: PLC0415  (matplotlib only when a plot is asked for)

        for trace_name, outcomes in by_trace.items():
            path = args.plot
            if len(by_trace) > 1:
                path = path.with_name(f"{path.stem}-{trace_name}{path.suffix or '.png'}")
            plots.append(str(plot.draw(outcomes, path)))

    capacities = {
        name: oracle.replica_capacity(workload.TRACES[name].classes, calib, run.default_spec(workload.TRACES[name]))
        for name in trace_names
    }
    if args.json:
        document = _document(
            calib, queue_limit=queue_limit, seed=args.seed, capacities=capacities, by_trace=by_trace,
            verdicts=verdicts, plots=plots, cpu_s=cpu_s,
        )  # fmt: skip
        print(json.dumps(document, indent=2))
        return 0 if all_pass else 1

    _print_setup(
        calib, run.default_spec(workload.TRACES[trace_names[0]]), queue_limit=queue_limit, seed=args.seed,
        capacities=capacities,
    )  # fmt: skip
    _print_outcomes(by_trace)
    _print_verdicts(verdicts, variants)
    for path in plots:
        print(f"plot: {path}")
    print(f"({cpu_s:.1f}s CPU)")
    return 0 if all_pass else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
