"""The converted checkpoint is reused only while its manifest verifies: any changed, missing or foreign
file sends `ensure()` back to converting."""

from __future__ import annotations

import dataclasses
import pathlib

import safetensors.torch
import torch

from fleetlm_dev import checkpoints

SOURCE = checkpoints.SMOLLM2_135M_INSTRUCT


def _directory(tmp_path: pathlib.Path) -> pathlib.Path:
    safetensors.torch.save_file({"w": torch.arange(6, dtype=torch.float32)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    checkpoints._write_manifest(tmp_path, SOURCE, sharded=False)
    return tmp_path


def test_a_manifest_catches_changed_missing_and_foreign_files(tmp_path: pathlib.Path) -> None:
    directory = _directory(tmp_path)
    assert checkpoints.verify(directory, SOURCE) is None
    assert checkpoints.weight_bytes(directory) == 24
    other = dataclasses.replace(SOURCE, version="9.9.9")
    assert "another source" in (checkpoints.verify(directory, other) or "")
    data = bytearray((directory / "model.safetensors").read_bytes())
    data[-1] ^= 1  # same size, one bit changed
    (directory / "model.safetensors").write_bytes(bytes(data))
    assert "sha256" in (checkpoints.verify(directory, SOURCE) or "")
    (directory / "config.json").unlink()
    assert "missing" in (checkpoints.verify(directory, SOURCE) or "")
    assert "manifest" in (checkpoints.verify(tmp_path / "absent", SOURCE) or "")


def test_the_cached_real_checkpoint_verifies(real_checkpoint: checkpoints.Checkpoint) -> None:
    for directory in (real_checkpoint.single, real_checkpoint.sharded):
        assert checkpoints.verify(directory, SOURCE) is None
    assert real_checkpoint.weight_bytes == checkpoints.weight_bytes(real_checkpoint.sharded) > 500e6
