"""Loading the real checkpoint onto the CPU holds at most 1.25x its weight bytes at the peak (model and
tokenizer, measured in a fresh process so the number is the load's own), and no more than plain
`from_pretrained` needs for the same model, both ready to serve."""

from __future__ import annotations

import pytest

from fleetlm_dev import bench_load, checkpoints

pytestmark = pytest.mark.slow


def test_fp32_load_peak_rss_is_within_one_and_a_quarter_weight_bytes(real_checkpoint: checkpoints.Checkpoint) -> None:
    ours = bench_load.measure("fleetlm", real_checkpoint.single, dtype="float32")
    assert ours["weight_bytes"] == real_checkpoint.weight_bytes
    assert ours["peak_rss_bytes"] <= 1.25 * ours["weight_bytes"], ours


def test_a_bf16_load_of_the_sharded_fp32_checkpoint_converts_tensor_by_tensor(
    real_checkpoint: checkpoints.Checkpoint,
) -> None:
    ours = bench_load.measure("fleetlm", real_checkpoint.sharded, dtype="bfloat16")
    assert ours["weight_bytes"] == real_checkpoint.weight_bytes // 2
    # The fp32 file is never resident beside the bf16 model: weights + one 16 MB chunk + the tokenizer
    # (about 60 MB whatever the model's size) and the code's first-call allocations.
    assert ours["peak_rss_bytes"] <= ours["weight_bytes"] + 128e6, ours
