"""The router's objects and the Inference Extension objects, as rendered: who they select, what the router
may do, which flags it runs with, and how QoS classes map onto objective priorities."""

from __future__ import annotations

from typing import Any

import pytest

from fleetlm_operator.api import models, spec_models
from fleetlm_operator.builders import inferencepool, meta, router
from fleetlm_operator.handlers import reconcile


def _svc(**spec: Any) -> models.LLMService:
    body = {
        "apiVersion": "fleetlm.dev/v1alpha1",
        "kind": "LLMService",
        "metadata": {"name": "chat", "namespace": "ns", "uid": "u1"},
        "spec": {"model": {"source": "builtin:tiny"}, **spec},
    }
    return models.LLMService.model_validate(body)


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_router_pods_are_never_runtime_pods_and_vice_versa() -> None:
    svc = _svc(router={"enabled": True})
    pod_labels = router.build_deployment(svc, default_image="img")["spec"]["template"]["metadata"]["labels"]
    assert not _labels_match(meta.selector_labels(svc), pod_labels)
    assert _labels_match(router.selector_labels(svc), pod_labels)
    assert not _labels_match(router.selector_labels(svc), meta.labels(svc))


def test_router_runs_with_the_spec_and_reads_the_runtime_service() -> None:
    svc = _svc(router={"enabled": True, "policy": "least-loaded", "prefixTokens": 128, "loadFactor": 1.5,
                       "hold": {"maxRequests": 9, "timeout": "2m"}, "image": "r:1", "replicas": 2})  # fmt: skip
    deployment = router.build_deployment(svc, default_image="default")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    flags = dict(zip(command[1::2], command[2::2], strict=False))
    assert command[0] == "fleetlm-router"
    assert flags["--service"] == "chat" and flags["--namespace"] == "ns" and flags["--port-name"] == "http"
    assert flags["--llmservice"] == "chat" and flags["--policy"] == "least-loaded"
    assert flags["--prefix-tokens"] == "128" and flags["--load-factor"] == "1.5"
    assert flags["--hold-max-requests"] == "9" and flags["--hold-timeout"] == "120"
    assert flags["--runtime-config"] == f"{meta.CONFIG_DIR}/{meta.CONFIG_KEY}"
    assert container["image"] == "r:1" and deployment["spec"]["replicas"] == 2
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "chat-router"
    from fleetlm_router import __main__ as router_main

    router_main.build_parser().parse_args(command[1:])  # every flag exists in the router's own parser


def test_router_rbac_is_minimal() -> None:
    svc = _svc(router={"enabled": True})
    rules = router.build_role(svc)["rules"]
    verbs = {(tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r.get("resourceNames", ()))): set(r["verbs"])
             for r in rules}  # fmt: skip
    assert verbs == {
        (("discovery.k8s.io",), ("endpointslices",), ()): {"get", "list", "watch"},
        (("fleetlm.dev",), ("llmservices/scale",), ("chat",)): {"get", "patch"},
        (("fleetlm.dev",), ("llmservices",), ("chat",)): {"patch"},
    }
    binding = router.build_role_binding(svc)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "chat-router", "namespace": "ns"}]


def test_children_include_the_router_only_when_enabled_and_the_pool_only_where_asked() -> None:
    tuning = models.initial_tuning(_svc().spec)

    def kinds(svc: models.LLMService, **kw: Any) -> list[str]:
        children = reconcile.render_children(svc, tuning=tuning, default_image="i", with_service_monitor=False, **kw)
        return [f"{c['kind']}/{c['metadata']['name']}" for c in children]

    plain = kinds(_svc())
    assert not any("router" in k for k in plain) and not any("Inference" in k for k in plain)
    with_router = kinds(_svc(router={"enabled": True}), router_image="ri")
    assert {"ServiceAccount/chat-router", "Role/chat-router", "RoleBinding/chat-router", "Service/chat-router",
            "Deployment/chat-router"} <= set(with_router)  # fmt: skip
    assert with_router.index("RoleBinding/chat-router") < with_router.index("Deployment/chat-router")
    classes = {"classes": [{"name": "live", "priority": 0}], "defaultClass": "live"}
    pooled = kinds(_svc(qos=classes), with_inference_pool=True, objective_api_version="llm-d.ai/v1alpha2")
    assert "InferencePool/chat" in pooled and "InferenceObjective/chat-live" in pooled
    # No classes: every request is priority 0, the picker's default without an objective; nothing to create.
    assert (
        kinds(_svc(), with_inference_pool=True, objective_api_version="llm-d.ai/v1alpha2")[-1] == "InferencePool/chat"
    )


def test_the_pool_selects_the_runtime_pods_on_their_port() -> None:
    pool = inferencepool.build_inference_pool(_svc())
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"]["selector"]["matchLabels"] == meta.selector_labels(_svc())
    assert pool["spec"]["targetPorts"] == [{"number": meta.HTTP_PORT}]


@pytest.mark.parametrize(
    ("classes", "expected"),
    [
        ([("default", 0, False)], {"default": 0}),
        ([("rt", 0, False), ("chat", 1, False), ("batch", 2, True)], {"rt": 1, "chat": 0, "batch": -1}),
        ([("a", 0, False), ("b", 0, False), ("s1", 3, True), ("s2", 5, True)], {"a": 0, "b": 0, "s1": -1, "s2": -2}),
        # A sheddable class stays below zero even where FleetLM ranks it above a protected one.
        ([("bulk", 0, True), ("chat", 1, False)], {"bulk": -1, "chat": 0}),
    ],
)
def test_objective_priorities_keep_order_and_put_sheddable_below_zero(classes, expected) -> None:
    spec_classes = [spec_models.QoSClass(name=n, priority=p, sheddable=s) for n, p, s in classes]
    assert inferencepool.objective_priorities(spec_classes) == expected


def test_objectives_reference_the_pool() -> None:
    svc = _svc(qos={"classes": [{"name": "chat", "priority": 0}, {"name": "batch", "priority": 1, "sheddable": True}],
                    "defaultClass": "chat"})  # fmt: skip
    objectives = inferencepool.build_objectives(svc, api_version="inference.networking.x-k8s.io/v1alpha2")
    assert [(o["metadata"]["name"], o["spec"]["priority"]) for o in objectives] == [
        ("chat-chat", 0),
        ("chat-batch", -1),
    ]
    assert all(o["spec"]["poolRef"] == {"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                        "name": "chat"} for o in objectives)  # fmt: skip


def test_idle_timeout_needs_min_zero_and_the_router() -> None:
    with pytest.raises(ValueError, match=r"idleTimeout needs spec\.replicas\.min 0"):
        _svc(replicas={"min": 1, "max": 2, "idleTimeout": "5m"}, router={"enabled": True})
    with pytest.raises(ValueError, match=r"idleTimeout needs spec\.router\.enabled"):
        _svc(replicas={"min": 0, "max": 2, "idleTimeout": "5m"})
    ok = _svc(replicas={"min": 0, "max": 2, "idleTimeout": "5m"}, router={"enabled": True})
    assert ok.spec.replicas.idle_timeout == "5m"
    with pytest.raises(ValueError):
        _svc(router={"enabled": True, "hold": {"timeout": "soon"}})
