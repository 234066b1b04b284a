"""The `fleetlm-runtime` command line: flags override the config file, bad configs and models fail with
clear exit codes; JSON logs are one object per line; GPU metrics come from NVML or are absent."""

from __future__ import annotations

import json
import logging
import pathlib
import subprocess
import sys
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import parser

from fleetlm_runtime import __main__ as cli
from fleetlm_runtime import contract, gpu, metrics


def test_flags_override_the_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "runtime.yaml"
    path.write_text("schemaVersion: v1\nbatching: {maxBatchSize: 4, maxBatchTokens: 64}\nserver: {port: 9999}\n")
    args = cli.build_parser().parse_args(
        ["--config", str(path), "--port", "1234", "--max-batch-tokens", "128", "--model", "builtin:small"]
    )
    cfg = cli.config_from_args(args)
    assert cfg.server.port == 1234 and cfg.server.host == "127.0.0.1"
    assert (cfg.batching.max_batch_size, cfg.batching.max_batch_tokens) == (4, 128)
    assert cfg.model.source == "builtin:small" and cfg.served_model_name == "small"


def test_bad_config_exits_2_naming_the_field(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "runtime.yaml"
    path.write_text("batching: {maxBatchSize: 0}\n")
    result = subprocess.run(
        [sys.executable, "-m", "fleetlm_runtime", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "batching.maxBatchSize" in result.stderr


def test_a_model_that_cannot_load_exits_1(
    start_runtime: Callable[..., Any], process_config: Callable[..., dict[str, Any]], tmp_path: pathlib.Path
) -> None:
    proc = start_runtime(process_config(model={"source": str(tmp_path / "no-such-model")}))
    assert proc.proc.wait(timeout=120) == 1
    assert "failed to start" in proc.log()


def test_json_log_lines(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        cli.setup_logging("json", "INFO")
        logging.getLogger("fleetlm_runtime.test").info("hello %s", "world")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    entry = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert entry["msg"] == "hello world" and entry["level"] == "INFO" and entry["logger"] == "fleetlm_runtime.test"


def test_no_gpu_means_no_gpu_metrics() -> None:
    sampler = gpu.open_nvml()
    if sampler is not None:
        sampler.close()
        pytest.skip("this machine has an NVIDIA GPU")
    m = metrics.RuntimeMetrics(model_name="tiny", max_model_len=64, gpu_sampler=None)
    names = {f.name for f in parser.text_string_to_metric_families(m.render().decode())}
    assert not names & contract.GPU_METRICS


class _FakeNvml:
    """Stands in for the `pynvml` module (its three calls), to check how samples become metrics."""

    class NVMLError(Exception):
        pass

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        if handle == 1:
            raise self.NVMLError("GPU is lost")
        return SimpleNamespace(gpu=37)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return SimpleNamespace(used=3 << 30, total=80 << 30)

    def nvmlShutdown(self) -> None:
        pass


def test_nvml_samples_become_gpu_metrics_and_lost_devices_are_skipped() -> None:
    sampler = gpu.NvmlSampler(_FakeNvml(), [0, 1])
    m = metrics.RuntimeMetrics(model_name="tiny", max_model_len=64, gpu_sampler=sampler)
    families = {f.name: f for f in parser.text_string_to_metric_families(m.render().decode())}
    (util,) = families[contract.GPU_UTILIZATION_RATIO].samples
    assert util.labels == {"model": "tiny", "gpu": "0"} and util.value == pytest.approx(0.37)
    (used,) = families[contract.GPU_MEMORY_USED_BYTES].samples
    assert used.value == 3 << 30
    assert families[contract.GPU_MEMORY_TOTAL_BYTES].samples[0].value == 80 << 30
    sampler.close()
