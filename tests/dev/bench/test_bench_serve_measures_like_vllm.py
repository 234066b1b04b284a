"""`fleetlm-dev bench serve` against the real runtime process: every request completes, token counts are
exact, the figures are vLLM's (TTFT, TPOT, ITL, E2EL percentiles, throughput, goodput), per QoS class too,
with JSON output and a PNG plot; and the arithmetic of the figures on hand-made results."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest

from fleetlm_dev import bench_serve


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, Any]:
    assert bench_serve.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_fixed_concurrency_json_and_plot(
    runtime_process: Any, capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    plot = tmp_path / "latency.png"
    out = _run(
        capsys,
        [
            "--url", runtime_process.url, "--num-prompts", "12", "--num-warmups", "2", "--max-concurrency", "4",
            "--input-len", "16", "--output-len", "8", "--goodput", "ttft:60000 tpot:60000",
            "--json", "--plot", str(plot), "--no-progress",
        ],
    )  # fmt: skip
    (rep,) = out["targets"]
    assert rep["model"] == "tiny"
    assert rep["completed"] == 12 and rep["failed"] == 0
    assert rep["total_output_tokens"] == 12 * 8  # from the usage chunks; EOS ignored
    assert rep["total_input_tokens"] == 12 * 16  # token-id prompts have exact lengths
    assert rep["max_concurrent_requests"] <= 4
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        stats = rep[key]
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"], (key, stats)
    assert rep["e2el_ms"]["mean"] >= rep["ttft_ms"]["mean"]
    assert rep["request_goodput"] == pytest.approx(rep["request_throughput"])  # generous SLOs: all good
    assert rep["slo_attainment"] == 1.0
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_poisson_shared_prefix_chat_with_class_mix(runtime_process: Any, capsys: pytest.CaptureFixture[str]) -> None:
    out = _run(
        capsys,
        [
            "--url", runtime_process.url, "--endpoint", "chat", "--num-prompts", "10", "--request-rate", "40",
            "--dataset", "shared-prefix", "--prefix-len", "24", "--num-prefixes", "2", "--input-len", "6",
            "--input-dist", "uniform", "--output-len", "6", "--class-mix", "interactive=0.5,batch=0.5",
            "--class-header", "--goodput", "ttft:0.001", "--class-goodput", "batch=ttft:60000",
            "--json", "--no-progress", "--seed", "3",
        ],
    )  # fmt: skip
    (rep,) = out["targets"]
    assert rep["completed"] == 10
    per_class = rep["per_class"]
    assert set(per_class) == {"interactive", "batch"}
    assert sum(c["completed"] for c in per_class.values()) == 10
    assert per_class["batch"]["slo_attainment"] == 1.0  # its own generous SLO
    assert per_class["interactive"]["slo_attainment"] == 0.0  # a 1 µs TTFT nobody meets


def test_compare_url_runs_the_same_requests_twice(runtime_process: Any, capsys: pytest.CaptureFixture[str]) -> None:
    out = _run(
        capsys,
        [
            "--url", runtime_process.url, "--compare-url", runtime_process.url, "--num-prompts", "4",
            "--input-len", "8", "--output-len", "4", "--json", "--no-progress",
        ],
    )  # fmt: skip
    a, b = out["targets"]
    assert a["total_output_tokens"] == b["total_output_tokens"] == 16
    assert out["ratio_output_throughput_a_over_b"] > 0


def test_table_output_and_failures_are_reported(runtime_process: Any, capsys: pytest.CaptureFixture[str]) -> None:
    url = runtime_process.url
    assert bench_serve.main(["--url", url, "--num-prompts", "2", "--output-len", "3", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "Output token throughput (tok/s)" in text and "TTFT" in text and "p99" in text
    # Prompts longer than the context are refused (400): counted as failures, exit code 1.
    code = bench_serve.main(["--url", url, "--num-prompts", "2", "--input-len", "5000", "--no-progress"])
    assert code == 1
    assert "400" in capsys.readouterr().out


def test_figures_follow_vllm_definitions() -> None:
    def result(ttft: float, latency: float, tokens: int, start: float, cls: str | None = None) -> Any:
        r = bench_serve.RequestResult(qos_class=cls, success=True, prompt_tokens=10, output_tokens=tokens)
        r.ttft_s, r.latency_s, r.start_s = ttft, latency, start
        gap = (latency - ttft) / max(tokens - 1, 1)
        r.itl_s = [gap] * (tokens - 1)
        r.chunk_times_s = [start + ttft + i * gap for i in range(tokens)]
        return r

    results = [result(0.1, 1.1, 11, 0.0), result(0.3, 0.3, 1, 0.5), result(0.2, 2.2, 5, 1.0)]
    slo = bench_serve.SLO(ttft_s=0.25, tpot_s=0.2)
    summary = bench_serve.summarize(results, 4.0, slo)
    assert summary["completed"] == 3
    assert summary["output_throughput"] == pytest.approx(17 / 4.0)
    assert summary["total_token_throughput"] == pytest.approx((30 + 17) / 4.0)
    # TPOT only for requests with more than one token: 0.1 s and 0.5 s.
    assert summary["tpot_ms"]["mean"] == pytest.approx(300.0)
    assert summary["ttft_ms"]["p50"] == pytest.approx(200.0)
    # Good: the first (ttft 0.1, tpot 0.1). Not: the second (ttft 0.3), the third (tpot 0.5).
    assert summary["request_goodput"] == pytest.approx(1 / 4.0)
    assert summary["max_concurrent_requests"] == 2
    assert len([g for r in results for g in r.itl_s]) == 10 + 0 + 4


def test_datasets_are_deterministic_and_shaped() -> None:
    ds = bench_serve.DatasetConfig(kind="shared-prefix", prefix_len=20, num_prefixes=2, input_len=5, output_len=7,
                                   class_mix=(("a", 1.0), ("b", 3.0)))  # fmt: skip
    first = bench_serve.build_dataset(ds, num=200, seed=1)
    assert first == bench_serve.build_dataset(ds, num=200, seed=1)
    assert all(len(s.prompt) == 25 and s.prompt_len == 25 for s in first)
    assert len({tuple(s.prompt[:20]) for s in first}) == 2  # two shared prefixes
    share_b = sum(s.qos_class == "b" for s in first) / len(first)
    assert 0.6 < share_b < 0.9
    lognormal = bench_serve.DatasetConfig(input_len=100, input_dist="lognormal", range_ratio=0.5)
    lengths = [s.prompt_len for s in bench_serve.build_dataset(lognormal, num=2000, seed=2)]
    assert 90 < sum(lengths) / len(lengths) < 110 and min(lengths) < 60 and max(lengths) > 160


def test_the_load_generator_never_imports_torch() -> None:
    import subprocess
    import sys

    code = "import sys, fleetlm_dev.bench_serve; sys.exit('torch' in sys.modules or 'fleetlm_runtime' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120, check=False).returncode == 0
