"""An interpreter with EleutherAI's `lm-eval` for the evaluation-client test, built once in the cache.

lm-eval cannot go into the project's venv: its table writer pins `python-dateutil<3` (typepy's datetime
extra) while the kubernetes client needs `>=3`, and pip either refuses or backtracks to years-old
releases. So it lives in an overlay venv under `$FLEETLM_CACHE/lm-eval/`: its own site-packages come
first (lm-eval, its dateutil and the rest), then a `.pth` line adds the project venv's site-packages, so
torch, transformers and the tokenizer are the very ones the runtime uses and are not downloaded twice.
Only this overlay's processes see the older dateutil.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import subprocess
import sys
import sysconfig
import venv

from fleetlm_dev import paths

# The versions the test was run with: the client as released, its API and HF extras.
REQUIREMENTS = ("lm_eval[api,hf]==0.4.13",)


def overlay_dir() -> pathlib.Path:
    return paths.cache_root() / "lm-eval"


def _stamp(base_site: str) -> str:
    return hashlib.sha256(json.dumps([REQUIREMENTS, base_site, sys.version]).encode()).hexdigest()[:16]


def ensure(*, quiet: bool = True) -> pathlib.Path:
    """The overlay's python, created and filled on first use (a minute or two: pip from PyPI)."""
    root = overlay_dir()
    python = root / "bin" / "python"
    base_site = sysconfig.get_paths()["purelib"]
    stamp_file = root / "fleetlm-stamp"
    if python.exists() and stamp_file.exists() and stamp_file.read_text() == _stamp(base_site):
        return python
    venv.EnvBuilder(clear=True, with_pip=True).create(root)
    site = pathlib.Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # Appended after the overlay's own site-packages: what the overlay installs shadows the project venv.
    (site / "fleetlm-base.pth").write_text(base_site + "\n")
    command = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *REQUIREMENTS]
    if quiet:
        command.insert(4, "-q")
    subprocess.run(command, check=True)
    stamp_file.write_text(_stamp(base_site))
    return python
