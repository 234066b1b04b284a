"""`fleetlm-operator`: run the kopf handlers that reconcile and tune LLMService objects.

Equivalent to `kopf run --standalone -m fleetlm_operator.handlers.main`, with FleetLM's flags:
namespaces to watch, the log format (`--log-format json` for machines), and the health endpoint.
Leader election between replicas happens in the startup handler (a Lease), not in kopf's peering.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import kopf

from fleetlm_operator import settings as settings_module


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetlm-operator", description=__doc__.splitlines()[0])
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        default=True,
        help="watch LLMService objects in every namespace (default)",
    )
    scope.add_argument(
        "-n", "--namespace", action="append", default=[], metavar="NS", help="watch only this namespace (repeatable)"
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="json: one JSON object per line, for log pipelines",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--health-port",
        type=int,
        default=None,
        help="port of the /healthz liveness endpoint (default from FLEETLM_HEALTH_PORT or 8080)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_module.OperatorSettings.from_env()
    kopf.configure(
        verbose=args.verbose, log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL
    )
    # Importing the handlers registers them with kopf's default registry.
    from fleetlm_operator.handlers import main as handlers  # noqa: F401, PLC0415

    health_port = settings.health_port if args.health_port is None else args.health_port
    kopf.run(
        standalone=True,  # no kopf peering: replicas coordinate through the leader Lease
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz" if health_port else None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
