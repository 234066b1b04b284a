"""The router ships in the operator's slim image: importing it (and starting its command) must never load
torch, transformers or the engine."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import fleetlm_router


def test_router_imports_no_torch_and_no_engine() -> None:
    code = (
        "import sys, fleetlm_router.__main__, fleetlm_router.app\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy')"
        " or m.startswith('fleetlm_runtime.engine') or m.startswith('fleetlm_runtime.models')]\n"
        "print(','.join(sorted(heavy)))\n"
    )
    root = str(pathlib.Path(fleetlm_router.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *sys.path])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == ""
