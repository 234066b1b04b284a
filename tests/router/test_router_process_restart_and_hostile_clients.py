"""The `fleetlm-router` process: a restart is only a retry to its clients (replicas notice nothing), an
in-flight stream finishes across SIGTERM, and hostile requests get the runtime's guarantees (never a
5xx from the router itself, and it keeps serving)."""

from __future__ import annotations

import http.client
import json
import pathlib
import threading
import time

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetlm_dev import bench_router


def _metric(url: str, name: str) -> float:
    return bench_router.scrape_counter(url, name)


@pytest.fixture
def router_process(replicas, tmp_path: pathlib.Path):
    endpoints = tmp_path / "endpoints.txt"
    bench_router.write_endpoints(endpoints, [r.url for r in replicas])
    started: list[bench_router.Process] = []

    def start(port: int | None = None) -> bench_router.Process:
        proc = bench_router.start_router(tmp_path, endpoints_file=endpoints, name=f"router-{len(started)}",
                                         port=port, args=["--shutdown-timeout", "20"])  # fmt: skip
        started.append(proc)
        proc.wait_ready(60)
        return proc

    yield start
    for proc in started:
        proc.stop()


def test_a_router_restart_is_only_a_retry(replicas, router_process) -> None:
    router = router_process()
    pids = [r.proc.pid for r in replicas]
    aborted_before = sum(_metric(r.url, "fleetlm_request_success_total") for r in replicas)
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
    assert client.completions.create(model="tiny", prompt="before", max_tokens=3).usage.completion_tokens == 3

    # A stream in flight when SIGTERM arrives finishes: the router stops listening, not serving.
    stream = client.completions.create(model="tiny", prompt=list(range(20, 40)), max_tokens=200, stream=True,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    chunks = [next(iter(stream))]
    stopper = threading.Thread(target=router.stop)
    stopper.start()
    chunks.extend(stream)
    stopper.join()
    assert chunks[-1].choices[0].finish_reason == "length"
    assert router.proc.returncode == 0

    with pytest.raises(openai.APIConnectionError):  # down: the client sees a connection error ...
        client.completions.create(model="tiny", prompt="during", max_tokens=3)
    restarted = router_process(port=router.port)  # ... and its retry, once the router is back, succeeds
    retrying = openai.OpenAI(base_url=restarted.url + "/v1", api_key="unused", max_retries=3)
    assert retrying.completions.create(model="tiny", prompt="after", max_tokens=3).usage.completion_tokens == 3
    assert [r.proc.pid for r in replicas] == pids and all(r.proc.poll() is None for r in replicas)
    finished = sum(_metric(r.url, "fleetlm_request_success_total") for r in replicas) - aborted_before
    assert finished == 3  # every request ran once to its end on a replica; nothing was aborted or repeated


PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/metrics", "/ready", "/health", "/nope")
_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=30)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | _text,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(_text, c, max_size=4),
    max_leaves=10,
)
_valid = st.fixed_dictionaries(
    {"model": st.just("tiny"), "prompt": _text | st.lists(st.integers(-5, 2000), max_size=40),
     "max_tokens": st.integers(-2, 6)},
    optional={"stream": st.booleans() | _json, "qos_class": _text | st.sampled_from(["batch", "interactive"]),
              "messages": _json, "temperature": st.floats(-1, 3) | _json},
)  # fmt: skip
_bodies = st.one_of(st.binary(max_size=200), _json.map(lambda v: json.dumps(v).encode()),
                    _valid.map(lambda v: json.dumps(v).encode()))  # fmt: skip
_headers = st.dictionaries(
    st.sampled_from(["X-FleetLM-QoS-Class", "Authorization", "Content-Type", "X-Forwarded-For"]),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40), max_size=3,
)  # fmt: skip


@pytest.fixture(scope="module")
def hostile_router(replicas, tmp_path_factory):
    directory = tmp_path_factory.mktemp("hostile")
    endpoints = directory / "endpoints.txt"
    bench_router.write_endpoints(endpoints, [r.url for r in replicas])
    proc = bench_router.start_router(directory, endpoints_file=endpoints, name="router")
    try:
        proc.wait_ready(60)
        yield proc
    finally:
        proc.stop()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(method=st.sampled_from(["GET", "POST", "PUT"]), path=st.sampled_from(PATHS), body=_bodies, headers=_headers)
def test_hostile_requests_never_get_a_5xx(hostile_router, method: str, path: str, body: bytes, headers: dict) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", hostile_router.port, timeout=60)
    try:
        conn.request(method, path, body=body if method != "GET" else None, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
    finally:
        conn.close()
    assert resp.status < 500, (resp.status, payload[:300])
    assert hostile_router.proc.poll() is None


def test_after_hostile_traffic_the_router_still_serves(hostile_router) -> None:
    client = openai.OpenAI(base_url=hostile_router.url + "/v1", api_key="unused", max_retries=0)
    started = time.monotonic()
    assert client.completions.create(model="tiny", prompt="still here", max_tokens=2).usage.completion_tokens == 2
    assert time.monotonic() - started < 30
