"""The operator extra installs and imports without torch, so the operator image stays slim.

Builds a wheel of this checkout and installs `fleetlm[operator]` into a fresh venv (pip's cache keeps
this fast), then imports every module of the operator package, none skipped (dev tooling such as the
simulator lives in dev/, not in it), checks that none loads torch or a dev-only package, and runs the
console script. The wheel is the one both images install: it must not carry the developer tools
(fleetlm_dev, `fleetlm-dev`), which are a project of their own (dev/pyproject.toml).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


# Without the checkout on PYTHONPATH (as the tests run), so that the fresh venv sees only what it installed.
_ENV = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def _run(*cmd: str, cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=False, cwd=cwd, timeout=600, env=_ENV)


def test_operator_extra_has_no_torch(tmp_path: pathlib.Path) -> None:
    venv = tmp_path / "venv"
    assert _run(sys.executable, "-m", "venv", str(venv)).returncode == 0
    python = str(venv / "bin" / "python")
    installed = _run(python, "-m", "pip", "install", "--disable-pip-version-check", "--quiet", f"{REPO_ROOT}[operator]")
    assert installed.returncode == 0, installed.stderr[-3000:]

    probe = _run(
        python,
        "-c",
        (
            "import importlib, importlib.metadata, importlib.util, pkgutil, sys\n"
            "shipped = {f.parts[0] for f in importlib.metadata.files('fleetlm') or ()}\n"
            "assert {'fleetlm_operator', 'fleetlm_runtime', 'fleetlm_router'} <= shipped, shipped\n"
            "assert 'fleetlm_dev' not in shipped, 'the shipped wheel carries the dev tools (fleetlm_dev)'\n"
            "scripts = {e.name for e in importlib.metadata.entry_points(group='console_scripts')}\n"
            "assert 'fleetlm-dev' not in scripts, 'the shipped wheel installs the fleetlm-dev command'\n"
            "assert importlib.util.find_spec('fleetlm_dev') is None, 'fleetlm_dev is importable'\n"
            "import fleetlm_operator\n"
            "for module in pkgutil.walk_packages(fleetlm_operator.__path__, 'fleetlm_operator.'):\n"
            "    importlib.import_module(module.name)\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch was imported'\n"
            "dev_only = sorted({n.split('.')[0] for n in sys.modules} & {'numpy', 'matplotlib', 'fleetlm_dev'})\n"
            "assert not dev_only, f'the operator imports dev-only packages: {dev_only}'\n"
            "print('ok')\n"
        ),
        cwd=tmp_path,
    )
    assert probe.returncode == 0 and probe.stdout.strip() == "ok", probe.stderr[-3000:]
    assert _run(python, "-c", "import torch").returncode != 0  # not installed at all
    help_text = _run(str(venv / "bin" / "fleetlm-operator"), "--help")
    assert help_text.returncode == 0 and "--log-format" in help_text.stdout


@pytest.mark.parametrize("dockerfile", ["operator/Dockerfile", "runtime/Dockerfile"])
def test_dockerfiles_run_as_non_root_and_install_the_right_extra(dockerfile: str) -> None:
    text = (REPO_ROOT / dockerfile).read_text()
    assert "USER 1000:1000" in text
    assert "COPY dev" not in text  # the developer tools are no part of either image
    if dockerfile.startswith("operator"):
        assert "'.[operator]'" in text and "[runtime]" not in text and "[dev]" not in text
        assert "FROM python:3.11-slim" in text
    else:
        assert "'.[runtime]'" in text and "FROM nvidia/cuda:" in text
    for copied in ("pyproject.toml", "operator", "runtime"):
        assert (REPO_ROOT / copied).exists()
