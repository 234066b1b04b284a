"""The model-cache fill program, run as the Job runs it: it copies a checkpoint directory into place in
one rename with a manifest, does nothing the second time, and tells permanent failures (exit 2) from
retryable ones (exit 3) without leaving half a checkpoint behind."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import time

from fleetlm_runtime.models import fill


def make_checkpoint(directory: pathlib.Path, *, weights: bytes = b"\x01" * 300_000) -> pathlib.Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text('{"model_type": "llama"}')
    (directory / "model.safetensors").write_bytes(weights)
    (directory / "sub").mkdir()
    (directory / "sub" / "tokenizer.json").write_text("{}")
    (directory / ".git").mkdir()  # never copied
    (directory / ".git" / "HEAD").write_text("ref")
    return directory


def run_fill(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "fleetlm_runtime.models.fill", *args], capture_output=True,
                          text=True, env=env, timeout=120, check=False)  # fmt: skip


def test_copy_lands_whole_with_a_manifest(tmp_path: pathlib.Path) -> None:
    source = make_checkpoint(tmp_path / "ckpt")
    dest = tmp_path / "volume" / "model-abc"
    result = run_fill("--source", str(source), "--dest", str(dest))
    assert result.returncode == fill.EXIT_OK, result.stderr
    manifest = json.loads((dest / fill.MANIFEST_NAME).read_text())
    assert manifest["source"] == str(source)
    assert {entry["path"] for entry in manifest["files"]} == {"config.json", "model.safetensors", "sub/tokenizer.json"}
    weights = (source / "model.safetensors").read_bytes()
    [entry] = [e for e in manifest["files"] if e["path"] == "model.safetensors"]
    assert entry == {"path": "model.safetensors", "bytes": len(weights), "sha256": hashlib.sha256(weights).hexdigest()}
    assert manifest["bytesTotal"] == sum(e["bytes"] for e in manifest["files"])
    assert (dest / "model.safetensors").read_bytes() == weights
    assert not (dest / ".git").exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model-abc"]  # no staging directory left


def test_a_second_fill_of_the_same_source_changes_nothing(tmp_path: pathlib.Path) -> None:
    source = make_checkpoint(tmp_path / "ckpt")
    dest = tmp_path / "volume" / "model-abc"
    assert run_fill("--source", str(source), "--dest", str(dest)).returncode == 0
    first = (dest / fill.MANIFEST_NAME).read_text()
    inode = dest.stat().st_ino
    assert run_fill("--source", str(source), "--dest", str(dest)).returncode == 0
    assert (dest / fill.MANIFEST_NAME).read_text() == first
    assert dest.stat().st_ino == inode


def test_a_new_source_replaces_the_old_checkpoint_in_one_rename(tmp_path: pathlib.Path) -> None:
    old = make_checkpoint(tmp_path / "old", weights=b"\x01" * 10)
    new = make_checkpoint(tmp_path / "new", weights=b"\x02" * 20)
    dest = tmp_path / "volume" / "model-abc"
    assert run_fill("--source", str(old), "--dest", str(dest)).returncode == 0
    assert run_fill("--source", str(new), "--dest", str(dest)).returncode == 0
    assert (dest / "model.safetensors").read_bytes() == b"\x02" * 20
    assert json.loads((dest / fill.MANIFEST_NAME).read_text())["source"] == str(new)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model-abc"]


def test_missing_source_and_non_checkpoints_are_permanent(tmp_path: pathlib.Path) -> None:
    dest = tmp_path / "volume" / "model-abc"
    missing = run_fill("--source", str(tmp_path / "nowhere"), "--dest", str(dest))
    assert missing.returncode == fill.EXIT_PERMANENT
    assert "SourceNotFound" in missing.stderr.splitlines()[-1]
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\x00")
    refused = run_fill("--source", str(pickled), "--dest", str(dest))
    assert refused.returncode == fill.EXIT_PERMANENT
    assert "NotACheckpoint" in refused.stderr.splitlines()[-1]
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []  # the staging directory went with the failure


def test_running_out_of_time_is_retryable_and_leaves_nothing(tmp_path: pathlib.Path) -> None:
    source = make_checkpoint(tmp_path / "ckpt")
    dest = tmp_path / "volume" / "model-abc"
    result = run_fill("--source", str(source), "--dest", str(dest), "--timeout", "0")
    assert result.returncode == fill.EXIT_RETRYABLE, result.stderr
    assert "Timeout" in result.stderr.splitlines()[-1]
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_a_bad_command_line_is_permanent(tmp_path: pathlib.Path) -> None:
    assert run_fill("--dest", str(tmp_path)).returncode == fill.EXIT_PERMANENT


def test_progress_goes_nowhere_without_an_api_server() -> None:
    assert fill.api_target("job", "ns", {}) is None
    assert fill.api_target(None, "ns", {"FLEETLM_API_SERVER": "https://127.0.0.1:1"}) is None


def test_the_bandwidth_cap_slows_the_copy_and_reports_every_step(tmp_path: pathlib.Path) -> None:
    source = make_checkpoint(tmp_path / "ckpt", weights=b"\x03" * 400_000)
    seen: list[tuple[int, int]] = []
    started = time.monotonic()
    files = fill.copy_tree(
        source,
        tmp_path / "out",
        deadline_s=started + 60,
        progress=lambda done, total: seen.append((done, total)),
        max_bytes_per_s=200_000,
    )
    elapsed_s = time.monotonic() - started
    total = sum(entry["bytes"] for entry in files)
    assert elapsed_s >= total / 200_000 * 0.9
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert len(seen) > 8  # a quarter-second of bytes per step: progress in between, not only at the end
