"""The committed CRD files are exactly what the models generate; `crdgen --check` says so too."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from fleetlm_operator.api import crdgen

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]


def test_committed_crd_files_equal_the_generated_ones() -> None:
    diffs = crdgen.check_crds(REPO_ROOT)
    assert not diffs, f"CRD files are stale; run `{crdgen.REGENERATE_COMMAND}`:\n" + "\n".join(diffs)


def test_chart_copy_is_the_same_crd_behind_the_install_switch() -> None:
    files = crdgen.render_files()
    plain = yaml.safe_load(files[crdgen.CRD_FILE])
    chart_text = files[crdgen.CHART_CRD_FILE]
    lines = chart_text.splitlines()
    assert lines[0] == "{{- if .Values.crds.install }}"
    assert lines[-1] == "{{- end }}"
    assert any("Generated from" in line and line.startswith("#") for line in lines[:4])
    chart = yaml.safe_load("\n".join(lines[1:-1]))
    # Helm must not delete the CRD, and every LLMService with it, on uninstall.
    assert chart["metadata"]["annotations"].pop("helm.sh/resource-policy") == "keep"
    assert chart == plain


def test_check_fails_with_a_diff_when_a_file_is_stale(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    crdgen.write_crds(tmp_path)
    assert crdgen.main(["--check", "--root", str(tmp_path)]) == 0

    stale = tmp_path / crdgen.CRD_FILE
    stale.write_text(stale.read_text(encoding="utf-8").replace("shortNames", "shortNamez"), encoding="utf-8")
    assert crdgen.main(["--check", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "-    shortNamez:" in out
    assert "+    shortNames:" in out


def test_check_fails_when_a_file_is_missing(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert crdgen.main(["--check", "--root", str(tmp_path)]) == 1
    assert str(crdgen.CHART_CRD_FILE) in capsys.readouterr().out


def test_generation_is_deterministic() -> None:
    assert crdgen.render_files() == crdgen.render_files()
