"""How the router asks for replicas while it holds requests, and reports that traffic still flows.

Scale from zero works by a division of labour, so that exactly one program writes each field:

- The router never scales anything. While it holds a request with no replica ready it asks, at most
  once per `scaleUpIntervalS`: `ApiScaler` writes the LLMService's `/scale` subresource (replicas 1) only
  when it reads 0 there, which is what `kubectl scale`, an HPA or KEDA would do. Its RBAC is `get` and
  `patch` on `llmservices/scale` for the one service (resourceNames), nothing else.
- While requests flow it stamps the annotation `fleetlm.dev/last-request-at` (at most once per
  `activityIntervalS`, through the same `/scale`-free `patch` on the LLMService object); the operator's
  idle handler reads it, so the idle timeout sees traffic the pods would also see, even traffic that was
  held and never reached a pod. (It needs `patch` on `llmservices` for that one name.)
- The operator's idle handler (`fleetlm_operator.handlers.idle`) scales to zero after `idleTimeout`
  without traffic and is the only writer of 0.

Kubernetes v1.37 HPA scale-to-zero (Beta, on by default) may target the same `/scale`: this ask writes 1
only when it reads 0, so it never lowers or fights a count an HPA, the tuner or a user set, and the
router holds requests at zero whoever scaled there (a Service does not buffer). One idle policy per
service: either `idleTimeout` (the operator writes 0) or an HPA with `minReplicas: 0` fed a metric that
counts held requests (`fleetlm_router_held_requests`), never both (README, "The front door").

Locally (tests, `fleetlm-dev bench router`) `FileScaler` writes the same requests to a file that the
harness, playing the operator, watches. Both requesters swallow and count errors: a failed request is
retried at the next interval while requests are still held; holding itself never depends on it.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import pathlib
import time
from typing import TYPE_CHECKING, Protocol

from fleetlm_runtime import contract

if TYPE_CHECKING:  # the client is imported on first use only (local runs without a cluster never import it)
    from kubernetes.client import CustomObjectsApi

log = logging.getLogger(__name__)

GROUP = "fleetlm.dev"
VERSION = "v1alpha1"
PLURAL = "llmservices"
ANNOTATION_LAST_REQUEST = contract.ANNOTATION_LAST_REQUEST  # its home: the contract the operator reads it by


def _stamp() -> str:
    return datetime.datetime.now(tz=datetime.UTC).isoformat(timespec="seconds")


class Scaler(Protocol):
    async def request_scale_up(self) -> None: ...
    async def report_activity(self) -> None: ...


class NullScaler:
    """Nobody to ask (a static endpoint list): holding just waits for a replica to appear."""

    async def request_scale_up(self) -> None:
        return None

    async def report_activity(self) -> None:
        return None


class FileScaler:
    """Appends `{"event": "scale_up"|"activity", "at": ...}` lines to a file (the local stand-in)."""

    def __init__(self, path: pathlib.Path) -> None:
        self._path = path

    def _append(self, event: str) -> None:
        with self._path.open("a") as f:
            f.write(json.dumps({"event": event, "at": time.time()}) + "\n")

    async def request_scale_up(self) -> None:
        await asyncio.to_thread(self._append, "scale_up")

    async def report_activity(self) -> None:
        await asyncio.to_thread(self._append, "activity")


class ApiScaler:
    """The LLMService's `/scale` subresource and its last-request annotation, through the API server."""

    def __init__(self, *, namespace: str, name: str, kubeconfig: str | None = None) -> None:
        self._namespace = namespace
        self._name = name
        self._kubeconfig = kubeconfig
        self._api: CustomObjectsApi | None = None

    def _custom(self) -> CustomObjectsApi:
        if self._api is None:
            from kubernetes import client, config  # noqa: PLC0415

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config(config_file=self._kubeconfig)
            self._api = client.CustomObjectsApi()
        return self._api

    def _scale_up(self) -> bool:
        api = self._custom()
        scale = api.get_namespaced_custom_object_scale(GROUP, VERSION, self._namespace, PLURAL, self._name)
        # The custom objects API returns the decoded JSON (typed `object` by the client).
        spec = scale.get("spec") if isinstance(scale, dict) else None
        if int((spec or {}).get("replicas") or 0) > 0:
            return False  # already asked for (by us, the operator or a user): never lower or race it
        api.patch_namespaced_custom_object_scale(
            GROUP, VERSION, self._namespace, PLURAL, self._name, {"spec": {"replicas": 1}}
        )
        return True

    def _activity(self) -> None:
        self._custom().patch_namespaced_custom_object(
            GROUP, VERSION, self._namespace, PLURAL, self._name,
            {"metadata": {"annotations": {ANNOTATION_LAST_REQUEST: _stamp()}}},
        )  # fmt: skip

    async def request_scale_up(self) -> None:
        if await asyncio.to_thread(self._scale_up):
            log.info("asked %s/%s to scale from 0 to 1", self._namespace, self._name)

    async def report_activity(self) -> None:
        await asyncio.to_thread(self._activity)
