"""`metricsSource: prometheus` against a real Prometheus (Debian's package) scraping real runtimes.

Two `fleetlm-runtime` processes on the built-in tiny model serve real requests; Prometheus scrapes them
every second with `pod`/`namespace` target labels, as a ServiceMonitor would; the collector's instant
queries must agree with a direct scrape, make a complete window from two readings, and report a
stopped pod as missing rather than idle.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest
import yaml

from fleetlm_dev import cluster
from fleetlm_dev.testing import stop_process, wait_for
from fleetlm_operator.collect import prometheus, scrape
from fleetlm_operator.policy import spec as policy_spec
from fleetlm_operator.policy import window

pytestmark = pytest.mark.slow
NAMESPACE = "demo"


class Process:
    def __init__(self, args: list[str], log: pathlib.Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        stop_process(self.proc)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return int(response.status), response.read().decode()
    except OSError as error:
        return 0, str(error)


def _complete(base: str, n: int) -> None:
    model = json.loads(_get(base + "/v1/models")[1])["data"][0]["id"]
    for i in range(n):
        body = json.dumps(
            {"model": model, "prompt": f"hello {time.time()} {i}", "max_tokens": 6, "temperature": 0}
        ).encode()
        request = urllib.request.Request(
            base + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    prometheus_bin = shutil.which("prometheus")
    assert prometheus_bin, "Debian's prometheus package is needed (make system-deps installs it)"
    work = tmp_path_factory.mktemp("prom")
    runtime_bin = str(pathlib.Path(sys.executable).parent / "fleetlm-runtime")
    pods = {"pod-a": cluster.free_port(), "pod-b": cluster.free_port()}
    runtimes = {
        pod: Process([runtime_bin, "--model", "builtin:tiny", "--port", str(port)], work / f"{pod}.log")
        for pod, port in pods.items()
    }
    prom_port = cluster.free_port()
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
        "scrape_configs": [
            {
                "job_name": "fleetlm",
                "static_configs": [
                    {"targets": [f"127.0.0.1:{port}"], "labels": {"pod": pod, "namespace": NAMESPACE}}
                    for pod, port in pods.items()
                ],
            }
        ],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = Process(
        [
            prometheus_bin,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        work / "prometheus.log",
    )
    try:
        for pod, port in pods.items():
            wait_for(f"{pod} ready", lambda port=port: _get(f"http://127.0.0.1:{port}/ready")[0] == 200, timeout_s=120)
        wait_for("prometheus ready", lambda: _get(f"http://127.0.0.1:{prom_port}/-/ready")[0] == 200, timeout_s=60)
        yield {"pods": pods, "runtimes": runtimes, "prometheus": f"http://127.0.0.1:{prom_port}"}
    finally:
        prom.stop()
        for runtime in runtimes.values():
            runtime.stop()


def _spec() -> policy_spec.PolicySpec:
    return policy_spec.PolicySpec(slo=policy_spec.SLOTargets(ttft_s=2.0, tpot_s=0.5), max_replicas=4, interval_s=2)


def _finished(sample: window.PodSample) -> float:
    return sum(sample.finished_by_class.values())


def test_prometheus_agrees_with_a_direct_scrape_and_makes_a_window(stack: dict) -> None:
    pods, base = stack["pods"], stack["prometheus"]
    for port in pods.values():
        _complete(f"http://127.0.0.1:{port}", 3)

    def caught_up() -> prometheus.QueryResult | None:
        result = asyncio.run(prometheus.query_pods(base, namespace=NAMESPACE, pods=sorted(pods), at_s=time.time()))
        return result if all(_finished(s) >= 3 for s in result.samples.values()) and len(result.samples) == 2 else None

    first = wait_for("Prometheus to scrape the traffic", caught_up, timeout_s=60)
    direct = asyncio.run(scrape.scrape_pods({pod: f"http://127.0.0.1:{port}" for pod, port in pods.items()}))
    assert not direct.errors
    for pod in pods:
        assert _finished(first.samples[pod]) == _finished(direct.samples[pod])
        assert first.samples[pod].ttft_by_class.keys() == direct.samples[pod].ttft_by_class.keys()
        assert not ({"ttft", "tpot", "running", "waiting", "kv_usage", "finished"} & first.samples[pod].missing)

    for port in pods.values():
        _complete(f"http://127.0.0.1:{port}", 4)
    second = wait_for(
        "the new traffic in Prometheus",
        lambda: (r := caught_up()) and all(_finished(s) >= 7 for s in r.samples.values()) and r,
        timeout_s=60,
    )
    now_s = max(s.scraped_at_s for s in second.samples.values())
    observed = window.from_scrapes(
        first.samples, second.samples, expected_pods=sorted(pods), spec=_spec(), now_s=now_s, max_age_s=60
    )
    assert observed.complete, observed.reason
    assert observed.num_pods_sampled == 2
    assert observed.ttft_quantile_s is not None and observed.ttft_quantile_s > 0
    assert observed.finished_per_s is not None and observed.finished_per_s > 0


def test_a_stopped_pod_is_missing_not_idle(stack: dict) -> None:
    pods, base = stack["pods"], stack["prometheus"]
    stack["runtimes"]["pod-b"].stop()

    def pod_b_gone() -> prometheus.QueryResult | None:
        result = asyncio.run(prometheus.query_pods(base, namespace=NAMESPACE, pods=sorted(pods), at_s=time.time()))
        return result if "pod-b" in result.errors else None

    # A failed scrape writes staleness markers, so the next instant query no longer returns pod-b.
    result = wait_for("pod-b reported missing", pod_b_gone, timeout_s=30)
    assert "no fresh series" in result.errors["pod-b"]
    assert "pod-a" in result.samples
    observed = window.from_scrapes(
        {}, result.samples, expected_pods=sorted(pods), spec=_spec(), now_s=time.time(), max_age_s=60
    )
    assert not observed.complete
    assert "pod-b" in observed.reason
