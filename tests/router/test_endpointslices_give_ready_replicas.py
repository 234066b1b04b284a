"""EndpointSlices to replicas: only ready, non-terminating endpoints on the named port, named by pod."""

from __future__ import annotations

from fleetlm_router import endpoints


def _slice(eps: list[dict], ports: list[dict] | None = None) -> dict:
    return {"ports": [{"name": "http", "port": 8000}] if ports is None else ports, "endpoints": eps}


def test_ready_endpoints_by_pod_name() -> None:
    slices = [
        _slice([
            {"addresses": ["10.0.0.1"], "conditions": {"ready": True}, "targetRef": {"name": "pod-a"}},
            {"addresses": ["10.0.0.2"], "conditions": {"ready": False}, "targetRef": {"name": "pod-b"}},
            {"addresses": ["10.0.0.3"], "conditions": {"ready": True, "terminating": True}, "targetRef": {"name": "c"}},
            {"addresses": ["10.0.0.4"], "conditions": {}},  # ready unset means ready
        ]),
        _slice([{"addresses": ["fd00::5"], "conditions": {"ready": True}, "targetRef": {"name": "pod-e"}}]),
    ]  # fmt: skip
    assert endpoints.replicas_from_slices(slices, port_name="http") == {
        "pod-a": "http://10.0.0.1:8000",
        "10.0.0.4:8000": "http://10.0.0.4:8000",
        "pod-e": "http://[fd00::5]:8000",
    }


def test_slices_without_the_port_contribute_nothing() -> None:
    eps = [{"addresses": ["10.0.0.1"], "conditions": {"ready": True}}]
    assert endpoints.replicas_from_slices([_slice(eps, ports=[{"name": "metrics", "port": 9}])], port_name="http") == {}
    assert endpoints.replicas_from_slices([_slice(eps, ports=[])], port_name=None) == {}
    assert endpoints.replicas_from_slices([{"endpoints": None, "ports": None}], port_name="http") == {}


def test_url_lists_skip_comments_and_blanks() -> None:
    text = "http://127.0.0.1:1/\n# a comment\n\nhttp://127.0.0.1:2  # trailing\n"
    assert endpoints.parse_url_list(text) == {"127.0.0.1:1": "http://127.0.0.1:1", "127.0.0.1:2": "http://127.0.0.1:2"}
