"""`fleetlm-router`: flags to settings, a replica source, a scaler; then serve until SIGTERM.

Replica sources (exactly one): `--endpoint URL` (repeatable), `--endpoints-file PATH` (re-read on change),
or `--service NAME` (EndpointSlice watch in `--namespace`, port `--port-name`). Scaling signals: `--llmservice
NAME` (the `/scale` subresource and the last-request annotation in the cluster) or `--scale-file PATH`
(a local harness plays the operator). This module is wiring only.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import pydantic
from aiohttp import web

from fleetlm_router import app as app_mod
from fleetlm_router import endpoints, scale, settings
from fleetlm_runtime import config as config_mod


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fleetlm-router", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--endpoint", action="append", help="a replica's base URL (repeatable)")
    src.add_argument("--endpoints-file", type=pathlib.Path, help="file of replica base URLs, one a line")
    src.add_argument("--service", help="runtime Service whose EndpointSlices list the replicas")
    p.add_argument("--namespace", default="default")
    p.add_argument("--port-name", default="http", help="EndpointSlice port name of the runtime's HTTP port")
    p.add_argument("--kubeconfig", default=None, help="outside a pod: the kubeconfig to use")
    p.add_argument("--llmservice", default=None, help="LLMService to ask for replicas (its /scale subresource)")
    p.add_argument("--scale-file", type=pathlib.Path, default=None, help="local stand-in for --llmservice")
    p.add_argument("--runtime-config", type=pathlib.Path, default=None, help="runtime config YAML (class rules)")
    p.add_argument("--api-keys-file", type=pathlib.Path, default=None, help="YAML map API key -> QoS class")
    p.add_argument("--policy", default=None, choices=("prefix-affinity", "least-loaded", "round-robin"))
    p.add_argument("--prefix-tokens", type=int, default=None)
    p.add_argument("--load-factor", type=float, default=None)
    p.add_argument("--max-attempts", type=int, default=None)
    p.add_argument("--hold-max-requests", type=int, default=None)
    p.add_argument("--hold-timeout", type=float, default=None, dest="hold_timeout_s")
    p.add_argument("--hold-comment-interval", type=float, default=None, dest="hold_comment_interval_s")
    p.add_argument(
        "--activity-interval",
        type=float,
        default=None,
        dest="activity_interval_s",
        help="seconds between 'traffic seen' stamps on the LLMService (keep well under its idleTimeout)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=None,
        dest="header_timeout_s",
        help="seconds a connection gets to send a request's headers (slow clients; idle keep-alive)",
    )
    p.add_argument(
        "--body-timeout", type=float, default=None, dest="body_timeout_s", help="seconds a request body gets to arrive"
    )
    p.add_argument("--max-body-bytes", type=int, default=None)
    p.add_argument(
        "--scrape-interval",
        type=float,
        default=None,
        dest="scrape_interval_s",
        help="seconds between scrapes of each replica's /metrics (0: off, own in-flight only)",
    )
    p.add_argument("--queue-saturated", type=int, default=None, help="queued requests that saturate a replica")
    p.add_argument("--scrape-timeout", type=float, default=None, dest="scrape_timeout_s")
    p.add_argument(
        "--scrape-stale",
        type=float,
        default=None,
        dest="scrape_stale_s",
        help="a replica's scraped load older than this many seconds is ignored",
    )
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds open streams get on SIGTERM")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fields = (
        "policy",
        "prefix_tokens",
        "load_factor",
        "max_attempts",
        "hold_max_requests",
        "hold_timeout_s",
        "hold_comment_interval_s",
        "activity_interval_s",
        "header_timeout_s",
        "body_timeout_s",
        "max_body_bytes",
        "scrape_interval_s",
        "scrape_timeout_s",
        "scrape_stale_s",
        "queue_saturated",
    )
    values: dict[str, Any] = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    try:
        cfg = settings.RouterSettings(host=args.host, port=args.port, **values)
    except pydantic.ValidationError as error:
        print(f"fleetlm-router: invalid settings: {error}", file=sys.stderr)
        return 2
    source: Any
    if args.endpoint:
        source = endpoints.StaticSource(args.endpoint)
    elif args.endpoints_file:
        source = endpoints.FileSource(args.endpoints_file)
    else:
        source = endpoints.EndpointSliceSource(
            namespace=args.namespace, service=args.service, port_name=args.port_name or None, kubeconfig=args.kubeconfig
        )
    scaler: scale.Scaler = scale.NullScaler()
    if args.llmservice:
        scaler = scale.ApiScaler(namespace=args.namespace, name=args.llmservice, kubeconfig=args.kubeconfig)
    elif args.scale_file:
        scaler = scale.FileScaler(args.scale_file)
    try:
        qos = config_mod.load_config(args.runtime_config).qos if args.runtime_config else config_mod.QoSSettings()
        keys = (
            config_mod.load_api_keys(args.api_keys_file, classes={c.name for c in qos.classes})
            if args.api_keys_file
            else {}
        )
    except config_mod.ConfigError as error:
        print(f"fleetlm-router: {error}", file=sys.stderr)
        return 2
    application = app_mod.create_app(
        cfg,
        source=source,
        qos_settings=qos,
        api_keys=keys,
        scaler=scaler,
        runtime_config_path=args.runtime_config,
        api_keys_path=args.api_keys_file,
    )
    # keepalive_timeout: aiohttp closes a connection still waiting for a request's headers this long after
    # it opened or answered, which bounds slow headers (slowloris) as well as idle keep-alive.
    # handler_cancellation: a client that hangs up cancels its handler, which closes the upstream
    # connection, so the replica aborts the sequence even while nothing is being written to the client.
    web.run_app(
        application, host=cfg.host, port=cfg.port, shutdown_timeout=args.shutdown_timeout, print=None,
        access_log=None, keepalive_timeout=cfg.header_timeout_s, handler_cancellation=True,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
