"""The operator extra installs and imports without torch, so the operator image stays slim.

Builds a wheel of this checkout and installs `fleetlm[operator]` into a fresh venv (pip's cache keeps
this fast), then imports every module of the operator package, none skipped (dev tooling such as the
simulator lives in dev/, not in it), checks that none loads torch or a dev-only package, and runs the
console script.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _run(*cmd: str, cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=False, cwd=cwd, timeout=600)


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
            "import importlib, pkgutil, sys\n"
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
    if dockerfile.startswith("operator"):
        assert "'.[operator]'" in text and "[runtime]" not in text and "[dev]" not in text
        assert "FROM python:3.11-slim" in text
    else:
        assert "'.[runtime]'" in text and "FROM nvidia/cuda:" in text
    for copied in ("pyproject.toml", "operator", "runtime"):
        assert (REPO_ROOT / copied).exists()
