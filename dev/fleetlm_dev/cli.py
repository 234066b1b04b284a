"""`fleetlm-dev`: the developer's command line (build, local cluster, demo, benchmarks).

Each subcommand is a thin shell around a module that does the work, so tests call the modules
directly and the CLI stays a table of verbs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import pathlib
import sys
from collections.abc import Callable, Sequence

from fleetlm_dev import cluster, k8s_build, paths


def _cmd_build(args: argparse.Namespace) -> int:
    toolset = k8s_build.build(args.k8s_version, force=args.force) if args.k8s_version else k8s_build.ensure_built()
    print(k8s_build.describe(toolset))
    return 0


def _cmd_cluster_up(args: argparse.Namespace) -> int:
    directory = pathlib.Path(args.dir).expanduser().resolve()
    plane = cluster.up(directory, timeout_s=args.timeout)
    if args.json:
        print(
            json.dumps(
                {
                    "kubeconfig": str(plane.kubeconfig),
                    "server": plane.server,
                    "version": plane.k8s_version,
                    "dir": str(directory),
                }
            )
        )
        return 0
    print(f"control plane {plane.k8s_version} is up at {plane.server}", file=sys.stderr)
    print(f"  use it:   export KUBECONFIG={plane.kubeconfig}", file=sys.stderr)
    print(f"  stop it:  fleetlm-dev cluster down --dir {directory}", file=sys.stderr)
    print(plane.kubeconfig)
    return 0


def _cmd_cluster_down(args: argparse.Namespace) -> int:
    directory = pathlib.Path(args.dir).expanduser().resolve()
    stopped = cluster.down(directory)
    for name in stopped:
        print(f"stopped {name}", file=sys.stderr)
    if not stopped:
        print("nothing was running", file=sys.stderr)
    return 0


def _cmd_cluster_status(args: argparse.Namespace) -> int:
    directory = pathlib.Path(args.dir).expanduser().resolve()
    plane = cluster.ControlPlane.load(directory)
    running = plane.running()
    for name, alive in running.items():
        print(f"{name:<24} {'running' if alive else 'stopped'}")
    print(f"kubeconfig: {plane.kubeconfig}")
    return 0 if running and all(running.values()) else 1


def _delegate(module: str) -> Callable[[argparse.Namespace], int]:
    """Subcommands owned by other modules parse their own arguments (`main(argv) -> int`)."""

    def run(args: argparse.Namespace) -> int:
        entry = importlib.import_module(module)
        return int(entry.main(list(args.extra)))

    return run


def _cmd_demo(args: argparse.Namespace) -> int:
    from fleetlm_dev import demo  # noqa: PLC0415  (pulls in the runtime only when asked)

    return demo.main(dir=pathlib.Path(args.dir).expanduser().resolve(), keep=args.keep)


# `fleetlm-dev bench <verb>`: each benchmark module parses its own arguments (see `main`).
_BENCHES = (
    ("engine", "fleetlm_dev.bench_engine", "engine tokens/s vs sequential generate()"),
    ("serve", "fleetlm_dev.bench_serve", "load generator against a running server (vLLM's metrics)"),
    ("server-overhead", "fleetlm_dev.bench_server_overhead", "server tok/s vs the engine's own, 32 streams"),
    ("prefix-cache", "fleetlm_dev.bench_prefix_cache", "TTFT with vs without the prefix cache (shared prompt)"),
    ("structured", "fleetlm_dev.bench_structured", "decode tok/s, 32 streams: half JSON-constrained vs none"),
    ("router", "fleetlm_dev.bench_router", "router prefix affinity vs round-robin, 3 replicas"),
    ("operator", "fleetlm_dev.bench_operator", "N LLMService objects at once: time and memory"),
    ("load", "fleetlm_dev.bench_load", "model load time and peak RSS: our loader vs from_pretrained"),
    ("overload", "fleetlm_dev.bench_overload", "a real runtime process under 3x its KV pool: completions, /ready, RSS"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetlm-dev", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    verbs = parser.add_subparsers(dest="verb", required=True)

    build = verbs.add_parser("build", help="build the control plane and helm from the Go module proxy (cached)")
    build.add_argument("--k8s-version", default=None, help=f"Kubernetes release (default {k8s_build.K8S_VERSION})")
    build.add_argument("--force", action="store_true", help="rebuild even when the cache is complete")
    build.set_defaults(func=_cmd_build)

    cluster_parser = verbs.add_parser("cluster", help="a local control plane on loopback")
    cluster_verbs = cluster_parser.add_subparsers(dest="cluster_verb", required=True)
    default_dir = str(paths.default_cluster_dir())
    up = cluster_verbs.add_parser("up", help="start etcd, apiserver, controller-manager, scheduler")
    up.add_argument("--dir", default=default_dir, help=f"state, logs and kubeconfig (default {default_dir})")
    up.add_argument("--timeout", type=float, default=180, help="seconds to wait for readiness")
    up.add_argument("--json", action="store_true", help="print a JSON line instead of prose")
    up.set_defaults(func=_cmd_cluster_up)
    down = cluster_verbs.add_parser("down", help="stop exactly the processes `up` started")
    down.add_argument("--dir", default=default_dir)
    down.set_defaults(func=_cmd_cluster_down)
    status = cluster_verbs.add_parser("status", help="which components run")
    status.add_argument("--dir", default=default_dir)
    status.set_defaults(func=_cmd_cluster_status)

    demo = verbs.add_parser(
        "demo", help="the closed loop locally: control plane, operator, runtime pods on the built-in model, a surge"
    )
    demo.add_argument("--dir", default=default_dir, help="state, logs, kubeconfig and demo.png")
    demo.add_argument("--keep", action="store_true", help="leave the control plane running when the demo ends")
    demo.set_defaults(func=_cmd_demo)

    bench = verbs.add_parser("bench", help="benchmarks that print figures against a baseline")
    bench_verbs = bench.add_subparsers(dest="bench_verb", required=True)
    for verb, module, help_ in _BENCHES:
        bench_verbs.add_parser(verb, help=help_, add_help=False).set_defaults(func=_delegate(module), delegated=True)

    simulate = verbs.add_parser("simulate", help="replay the tuning policy against simulated replicas", add_help=False)
    simulate.set_defaults(func=_delegate("fleetlm_dev.simulate"), delegated=True)

    checkpoint = verbs.add_parser(
        "checkpoint", help="convert the real test checkpoint (SmolLM2-135M) into the cache", add_help=False
    )
    checkpoint.set_defaults(func=_delegate("fleetlm_dev.checkpoints"), delegated=True)
    gpu_check = verbs.add_parser(
        "gpu-check", help="readiness: greedy equality, tok/s vs generate(), memory, NVML", add_help=False
    )
    gpu_check.set_defaults(func=_delegate("fleetlm_dev.gpu_check"), delegated=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Delegated verbs parse their own arguments (including --help): pass them what is left over.
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "delegated", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (cluster.ClusterError, k8s_build.BuildError) as error:
        print(f"fleetlm-dev: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
