"""Where build outputs live: a cache outside the repository.

Everything FleetLM's tooling builds or downloads (Kubernetes binaries, the venv, benchmark output)
goes under one cache root so a fresh clone stays clean and a warm machine skips the work.
The root is ``$FLEETLM_CACHE`` or ``~/.cache/fleetlm``.
"""

from __future__ import annotations

import os
import pathlib
import sys


def cache_root() -> pathlib.Path:
    configured = os.environ.get("FLEETLM_CACHE")
    root = pathlib.Path(configured) if configured else pathlib.Path.home() / ".cache" / "fleetlm"
    return root.expanduser()


def k8s_cache_dir(version: str) -> pathlib.Path:
    return cache_root() / "k8s" / version


def default_cluster_dir() -> pathlib.Path:
    return cache_root() / "cluster"


def repo_root() -> pathlib.Path:
    # dev/fleetlm_dev/paths.py -> repository root; valid for editable installs, which is how the
    # dev tooling is always installed (it drives files in the checkout: charts, CRDs, tests).
    return pathlib.Path(__file__).resolve().parents[2]


def venv_bin(name: str) -> pathlib.Path | None:
    """A console script installed next to the running interpreter (kubectl from PyPI lives there)."""
    candidate = pathlib.Path(sys.executable).parent / name
    return candidate if candidate.exists() else None
