"""The local demo behind `make demo`: everything FleetLM needs, on this machine, on loopback.

Today it brings up the real control plane and shows how to reach it; it grows with the project
(operator, runtime pods on the built-in tiny model, a load that the tuner answers).
"""

from __future__ import annotations

import contextlib
import pathlib
import signal
import sys
import threading

from fleetlm_dev import cluster


def main(*, dir: pathlib.Path, keep: bool) -> int:
    print(f"starting a local control plane in {dir} ...", file=sys.stderr)
    plane = cluster.up(dir)
    try:
        print(plane.kubectl("version").stdout)
        print(plane.kubectl("get", "namespaces").stdout)
        print(f"The control plane is up: export KUBECONFIG={plane.kubeconfig}")
        if keep:
            print(f"Left running; stop it with: fleetlm-dev cluster down --dir {dir}")
            return 0
        if sys.stdin.isatty():
            print("Press Ctrl-C to stop it.")
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            with contextlib.suppress(KeyboardInterrupt):
                stop.wait()
        return 0
    finally:
        if not keep:
            for name in plane.stop():
                print(f"stopped {name}", file=sys.stderr)
            cluster.down(dir)
