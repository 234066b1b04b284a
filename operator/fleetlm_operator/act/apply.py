"""Write child objects with server-side apply, read what the status needs, and patch LLMService status.

Server-side apply with one field manager makes every write idempotent: reconciling twice, or after an
operator restart, converges on the same objects and never creates duplicates. Fields the operator does
not set (e.g. a Service's clusterIP) stay with whoever owns them.

This module is the operator's only writer to the API server besides kopf itself; it decides nothing
about what the objects contain (builders do) or when to write them (handlers do).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, cast

from kubernetes import client, dynamic
from kubernetes.client import exceptions
from kubernetes.dynamic import exceptions as dynamic_exceptions

from fleetlm_operator.api import names

logger = logging.getLogger(__name__)

FIELD_MANAGER = "fleetlm-operator"
NEGATIVE_CACHE_S = 60.0


class Applier:
    def __init__(self, api_client: client.ApiClient) -> None:
        self._api_client = api_client
        self._dynamic = dynamic.DynamicClient(api_client)
        self._core = client.CoreV1Api(api_client)
        self._apps = client.AppsV1Api(api_client)
        self._custom = client.CustomObjectsApi(api_client)
        self._lock = threading.Lock()  # the discovery cache is not safe for concurrent refreshes
        self._absent_checked: dict[tuple[str, str], float] = {}

    def _resource(self, api_version: str, kind: str) -> Any:
        with self._lock:
            return self._dynamic.resources.get(api_version=api_version, kind=kind)

    def has_kind(self, api_version: str, kind: str) -> bool:
        """Whether the cluster serves this kind (e.g. the ServiceMonitor CRD of prometheus-operator).

        Discovery is cached; a "no" is re-checked with fresh discovery at most once a minute, so a CRD
        installed after start-up is noticed without a full discovery on every reconcile.
        """
        key = (api_version, kind)
        try:
            self._resource(api_version, kind)
            return True
        except dynamic_exceptions.ResourceNotFoundError:
            pass
        now = time.monotonic()
        with self._lock:
            if now - self._absent_checked.get(key, -NEGATIVE_CACHE_S) < NEGATIVE_CACHE_S:
                return False
            self._absent_checked[key] = now
            self._dynamic.resources.invalidate_cache()
        try:
            self._resource(api_version, kind)
            return True
        except dynamic_exceptions.ResourceNotFoundError:
            return False

    def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply `manifest`; returns the object as stored."""
        resource = self._resource(manifest["apiVersion"], manifest["kind"])
        metadata = manifest["metadata"]
        applied = resource.server_side_apply(
            body=dict(manifest),
            name=metadata["name"],
            namespace=metadata.get("namespace"),
            field_manager=FIELD_MANAGER,
            force_conflicts=True,
        )
        return dict(applied.to_dict())

    def delete_if_present(self, api_version: str, kind: str, name: str, namespace: str) -> bool:
        """Delete one object if it exists (a child whose feature was switched off); whether it existed."""
        try:
            self._resource(api_version, kind).delete(name=name, namespace=namespace)
            return True
        except dynamic_exceptions.NotFoundError:
            return False

    def create_if_missing(self, manifest: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create `manifest` unless an object of that name exists; returns (object, created)."""
        resource = self._resource(manifest["apiVersion"], manifest["kind"])
        metadata = manifest["metadata"]
        try:
            existing = resource.get(name=metadata["name"], namespace=metadata.get("namespace"))
            return dict(existing.to_dict()), False
        except dynamic_exceptions.NotFoundError:
            pass
        try:
            created = resource.create(
                body=dict(manifest), namespace=metadata.get("namespace"), field_manager=FIELD_MANAGER
            )
            return dict(created.to_dict()), True
        except dynamic_exceptions.ConflictError:
            # Lost a race with another writer: theirs stands.
            existing = resource.get(name=metadata["name"], namespace=metadata.get("namespace"))
            return dict(existing.to_dict()), False

    def read_deployment(self, name: str, namespace: str) -> dict[str, Any] | None:
        try:
            deployment = self._apps.read_namespaced_deployment(name, namespace)
        except exceptions.ApiException as error:
            if error.status == 404:
                return None
            raise
        return dict(self._api_client.sanitize_for_serialization(deployment))

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        pods = self._core.list_namespaced_pod(namespace, label_selector=selector)
        return [dict(self._api_client.sanitize_for_serialization(pod)) for pod in pods.items]

    def read_secret(self, name: str, namespace: str) -> dict[str, Any] | None:
        try:
            found = self._core.read_namespaced_secret(name, namespace)
        except exceptions.ApiException as error:
            if error.status == 404:
                return None
            raise
        return dict(self._api_client.sanitize_for_serialization(found))

    def read_llmservice(self, name: str, namespace: str) -> dict[str, Any] | None:
        try:
            found = self._custom.get_namespaced_custom_object(names.GROUP, names.VERSION, namespace, names.PLURAL, name)
        except exceptions.ApiException as error:
            if error.status == 404:
                return None
            raise
        # The client types a custom object as `object`; it is the resource's JSON, a dict.
        return dict(cast(dict[str, Any], found))

    def patch_llmservice_status(
        self, name: str, namespace: str, status: Mapping[str, Any], *, resource_version: str | None = None
    ) -> bool:
        """Merge-patch the status subresource; a deleted LLMService is not an error.

        With `resource_version` the patch applies only to that version of the object (optimistic
        concurrency): False when the object has changed since, so the caller re-reads and decides again.
        """
        body: dict[str, Any] = {"status": dict(status)}
        if resource_version is not None:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            self._custom.patch_namespaced_custom_object_status(
                names.GROUP, names.VERSION, namespace, names.PLURAL, name, body
            )
        except exceptions.ApiException as error:
            if error.status == 409 and resource_version is not None:
                return False
            if error.status != 404:
                raise
        return True

    def apply_llmservice_conditions(
        self, name: str, namespace: str, conditions: list[dict[str, Any]], *, field_manager: str, force: bool = True
    ) -> bool:
        """Server-side apply `conditions` (one writer's full set) on the status subresource as `field_manager`.

        status.conditions is a list-map keyed by `type`, so the API server merges entry by entry: entries
        another manager owns stay as they are, and this manager's entries not in `conditions` go. A
        condition type has one writer, which forces (a conflict is then only a leftover of an older
        operator's patch); unforced, a value another manager set wins and this returns False. A deleted
        LLMService is not an error.
        """
        resource = self._resource(f"{names.GROUP}/{names.VERSION}", names.KIND)
        body = {
            "apiVersion": f"{names.GROUP}/{names.VERSION}",
            "kind": names.KIND,
            "metadata": {"name": name, "namespace": namespace},
            "status": {"conditions": conditions},
        }
        try:
            self._dynamic.server_side_apply(
                resource.status,
                body=body,
                name=name,
                namespace=namespace,
                field_manager=field_manager,
                force_conflicts=force,
            )
        except dynamic_exceptions.NotFoundError:
            return False
        except dynamic_exceptions.ConflictError:
            if force:
                raise
            return False
        return True

    def patch_llmservice_replicas(self, name: str, namespace: str, replicas: int) -> None:
        """Write the desired replica count where /scale reads it (spec.replicas.desired)."""
        self._custom.patch_namespaced_custom_object(
            names.GROUP, names.VERSION, namespace, names.PLURAL, name, {"spec": {"replicas": {"desired": replicas}}}
        )
