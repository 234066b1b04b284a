"""The `fleetlm-router` process in front of real runtime processes, against clients that misbehave: the
runtime's guarantees hold at the router too. An oversized body is a 413 and malformed JSON a 400, both in
OpenAI's error shape and answered by the router (even with no replica to ask); slow headers and a slow
body are cut at their bounds; a client that hangs up mid-stream, or mid-way through a plain request,
frees its slot on the replica (the sequence is aborted there, not run to its end)."""

from __future__ import annotations

import asyncio
import json
import pathlib
import socket
import time

import aiohttp
import pytest

from fleetlm_dev import bench_router

LONG = {"model": "tiny", "prompt": list(range(20, 40)), "max_tokens": 480, "ignore_eos": True, "temperature": 0}


@pytest.fixture
def router_process(tmp_path: pathlib.Path):
    started: list[bench_router.Process] = []

    def start(urls: list[str], *args: str) -> bench_router.Process:
        endpoints = tmp_path / f"endpoints-{len(started)}.txt"
        bench_router.write_endpoints(endpoints, urls)
        proc = bench_router.start_router(tmp_path, endpoints_file=endpoints, name=f"router-{len(started)}",
                                         args=list(args))  # fmt: skip
        started.append(proc)
        proc.wait_ready(60)
        return proc

    yield start
    for proc in started:
        proc.stop()


def _assert_openai_error(payload: bytes, *, code: str | None = None) -> dict:
    error = json.loads(payload)["error"]
    assert set(error) == {"message", "type", "code", "param"} and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def _raw(port: int, data: bytes, *, timeout_s: float = 10.0) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_oversized_and_malformed_bodies_are_answered_by_the_router(replicas, router_process) -> None:
    router = router_process([replicas[0].url], "--max-body-bytes", "65536")
    no_replica = router_process([], "--hold-timeout", "30")  # a malformed body must not wait for a replica
    rejected_before = bench_router.scrape_counter(replicas[0].url, "fleetlm_requests_rejected_total")
    big = json.dumps({"model": "tiny", "prompt": "x" * 70_000}).encode()
    request = b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nConnection: close\r\nContent-Type: application/json\r\n"
    status, body = _raw(router.port, request + f"Content-Length: {len(big)}\r\n\r\n".encode() + big)
    assert status == 413
    assert "65536" in _assert_openai_error(body, code="too_large")["message"]
    for target in (router, no_replica):
        for raw in (b"{", b"not json", b"[1, 2]", b"\xff\xfe", b'{"prompt": NaN}'):
            started = time.monotonic()
            status, body = _raw(target.port, request + f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
            assert status == 400, body
            error = _assert_openai_error(body)
            assert error["type"] == "invalid_request_error" and error["param"] is None
            assert "JSON" in error["message"] or "UTF-8" in error["message"]
            assert time.monotonic() - started < 5
    rejected = bench_router.scrape_counter(replicas[0].url, "fleetlm_requests_rejected_total") - rejected_before
    assert rejected == 0  # never forwarded


def test_slow_headers_and_slow_bodies_are_cut_at_their_bounds(replicas, router_process) -> None:
    router = router_process([replicas[0].url], "--header-timeout", "1.5", "--body-timeout", "1.5")
    # Slow headers: a byte every 0.2 s never completes them; the connection is closed at the bound.
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: r\r\n")
        closed_after = None
        for i in range(100):
            try:
                sock.sendall(b"X-Slow-%d: 1\r\n" % i)
                sock.settimeout(0.2)
                if sock.recv(1024) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - started
                break
    assert closed_after is not None and 1.4 <= closed_after < 5, closed_after
    # Slow body: the headers promise 1000 bytes, 10 arrive; a 408 in OpenAI's shape at the bound.
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Length: 1000\r\n\r\n{"model":')
        reply = sock.recv(65536)
        waited = time.monotonic() - started
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split()[1] == b"408" and 1.4 <= waited < 5, (head, waited)
    assert "1.5s" in _assert_openai_error(body, code="timeout")["message"]
    # An idle connection is closed at the same bound; the router keeps serving.
    status, _ = _raw(router.port, b"GET /health HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n")
    assert status == 200


def _replica_state(url: str) -> tuple[float, float]:
    running = bench_router.scrape_counter(url, "vllm:num_requests_running")
    aborted = 0.0
    status, text = bench_router._get(url + "/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith("fleetlm_request_success_total{") and 'finished_reason="abort"' in line:
            aborted += float(line.rsplit(" ", 1)[1])
    return running, aborted


async def _until_idle(url: str, aborted_before: float, *, timeout_s: float = 10.0) -> float:
    """Seconds until the replica runs nothing; then checks the sequence was aborted, not finished."""
    started = time.monotonic()
    while _replica_state(url)[0] != 0:
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"the replica still runs the request: {_replica_state(url)}")
        await asyncio.sleep(0.05)
    freed_s = time.monotonic() - started
    # The engine reports an abort with its next step: one short request flushes it.
    async with aiohttp.ClientSession() as session:
        body = {"model": "tiny", "prompt": "flush", "max_tokens": 1}
        async with session.post(url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
    for _ in range(100):
        if _replica_state(url)[1] == aborted_before + 1:
            return freed_s
        await asyncio.sleep(0.05)
    raise AssertionError(f"no abort counted: {_replica_state(url)}")


async def test_a_client_that_hangs_up_frees_its_slot_on_the_replica(replicas, router_process) -> None:
    replica = replicas[1]
    router = router_process([replica.url], "--scrape-interval", "0")
    _, aborted = _replica_state(replica.url)
    async with aiohttp.ClientSession() as session:
        # Mid-stream: the first tokens arrive, then the client closes the connection.
        resp = await session.post(router.url + "/v1/completions", json={**LONG, "stream": True})
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")
        assert _replica_state(replica.url)[0] == 1
        resp.close()
        freed_s = await _until_idle(replica.url, aborted)
        # A plain request: nothing is written to the client until the end, so only the hang-up tells.
        _, aborted = _replica_state(replica.url)
        task = asyncio.create_task(session.post(router.url + "/v1/completions", json=LONG))
        for _ in range(200):
            if _replica_state(replica.url)[0] == 1:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the plain request never started on the replica")
        task.cancel()
        freed_plain_s = await _until_idle(replica.url, aborted)
    assert freed_s < 5 and freed_plain_s < 5
    assert bench_router.scrape_counter(router.url, "fleetlm_router_in_flight") == 0
