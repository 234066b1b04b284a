"""Property: nothing a client sends makes the server answer 5xx or crash, and it serves normally afterwards.

Hypothesis throws malformed and hostile requests at the real `fleetlm-runtime` process: arbitrary bytes,
JSON of the wrong shape, every known parameter with values of every type (huge numbers, NaN, lone
surrogates, deep nesting, empty and enormous strings), unknown QoS classes and admin calls without the
token. The process runs with a 64-token context so that the requests that are valid stay short.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

PATHS = ("/v1/completions", "/v1/chat/completions", "/admin/config", "/v1/models", "/metrics", "/ready", "/nope")
PARAMS = (
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
    "seed", "stop", "stop_token_ids", "ignore_eos", "stream", "stream_options", "logprobs", "echo", "best_of",
    "presence_penalty", "frequency_penalty", "logit_bias", "user", "qos_class", "tools", "response_format",
    "include_stop_str_in_output", "batching", "schemaVersion", "top_logprobs", "repetition_penalty",
)  # fmt: skip

_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)  # lone surrogates included
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    _text,
)
_json = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=12,
)
_plausible = {
    "model": st.sampled_from(["tiny", "", "other"]) | _text,
    "prompt": _text | st.lists(st.integers(-5, 2000), max_size=70) | st.lists(_text, max_size=3) | _json,
    "messages": st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]), "content": _text | _json}
        ),
        max_size=3,
    )
    | _json,
    "max_tokens": st.integers(-3, 80) | _json,
    "temperature": st.floats(-1, 3) | _json,
    "stream": st.booleans() | _json,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | _json}) | _json,
    "stop": st.lists(_text, max_size=3) | _text | _json,
}


@st.composite
def _requests(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """(method, path, body). A third are valid requests with up to three fields made hostile, so the
    engine sees odd-but-valid input too; the rest are arbitrary bytes or JSON of the wrong shape."""
    method = draw(st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE"]))
    path = draw(st.sampled_from(PATHS))
    kind = draw(st.sampled_from(["bytes", "json", "mutated"]))
    if kind == "bytes":
        return method, path, draw(st.binary(max_size=200))
    if kind == "json":
        return method, path, json.dumps(draw(_json)).encode()
    chat = draw(st.booleans())
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict[str, Any] = {"model": "tiny", "max_tokens": draw(st.integers(1, 8))}
    if chat:
        body["messages"] = [{"role": "user", "content": draw(_text)}]
    else:
        body["prompt"] = draw(st.text(min_size=1, max_size=40) | st.lists(st.integers(0, 900), min_size=1, max_size=40))
    body["stream"] = draw(st.booleans())
    for key in draw(st.lists(st.sampled_from(PARAMS), max_size=3, unique=True)):
        body[key] = draw(_plausible[key]) if key in _plausible else draw(_json)
    if draw(st.integers(0, 20)) == 0:
        body["prompt"] = "[" * 5000  # a large, odd prompt
    return "POST", path, json.dumps(body).encode()  # NaN/Infinity come out as such: invalid JSON on purpose


_headers = st.fixed_dictionaries(
    {},
    optional={
        "Content-Type": st.sampled_from(["application/json", "text/plain", "multipart/form-data", "", "\x7f"]),
        "X-FleetLM-QoS-Class": st.sampled_from(["interactive", "batch", "gold", "", "a" * 300]),
        "Authorization": st.sampled_from(["Bearer nope", "Basic xx", "Bearer", ""]),
    },
)


def _request(port: int, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_hostile_requests_never_get_5xx_and_the_server_survives(
    start_runtime: Callable[..., Any], process_config: Callable[..., dict[str, Any]]
) -> None:
    qos = {
        "classes": [{"name": "interactive"}, {"name": "batch", "queueLimit": 2}],
        "defaultClass": "interactive",
        "allowClassHeader": True,
    }
    proc = start_runtime(
        process_config(
            model={"maxModelLen": 64},
            qos=qos,
            server={"maxRequestBodyBytes": 65536},
            caching={"responseCache": {"enabled": True, "maxEntries": 8}},
        )
    )
    proc.wait_ready()

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(request=_requests(), headers=_headers)
    def check(request: tuple[str, str, bytes], headers: dict[str, str]) -> None:
        method, path, body = request
        status, payload = _request(proc.port, method, path, body, headers)
        assert status < 500, (status, payload[:300])
        if status >= 400 and path.startswith("/v1/") and not payload.startswith(b"Invalid header"):
            # Every refusal our handlers make is in OpenAI's shape (aiohttp's HTTP parser refuses broken
            # headers itself, with a plain-text 400, before any handler runs).
            error = json.loads(payload)["error"]
            assert {"message", "type", "code", "param"} <= set(error)
        assert proc.proc.poll() is None, proc.log()

    check()

    status, payload = _request(
        proc.port,
        "POST",
        "/v1/completions",
        json.dumps({"model": "tiny", "prompt": "still here?", "max_tokens": 5, "ignore_eos": True}).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 200, payload
    assert json.loads(payload)["usage"]["completion_tokens"] == 5
    assert _request(proc.port, "GET", "/health", b"", {})[0] == 200
    assert _request(proc.port, "GET", "/ready", b"", {})[0] == 200
    # The run reached the engine too, not only the validators.
    metrics = _request(proc.port, "GET", "/metrics", b"", {})[1].decode()
    served = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("fleetlm_request_success_total")
    )
    assert served >= 5, metrics
    log = proc.log()
    # aiohttp logs the header-level refusals of its own parser; none of our handlers may have failed.
    assert "unhandled error" not in log and "fleetlm_runtime/server" not in log, log
