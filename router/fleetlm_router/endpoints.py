"""The ready replicas the router may send to, and where that list comes from.

`EndpointSet` is the one place the proxy reads replicas from; sources replace its content whole:

- `StaticSource`: a fixed list of base URLs (`--endpoint URL`, repeatable), for local runs.
- `FileSource`: a file of base URLs, one a line (`#` comments), re-read when it changes: tests and the
  benchmark add and remove replicas by rewriting it.
- `EndpointSliceSource`: in the cluster, a watch on the EndpointSlices of the runtime Service
  (`kubernetes.io/service-name=<service>`). Only endpoints whose `ready` condition is not false and that
  are not terminating are used, as kube-proxy does, so a draining pod (readiness false after SIGTERM)
  gets no new requests while its streams finish.

`replicas_from_slices` (pure) turns EndpointSlice objects into `{replica name: base URL}`; the watch
runs the blocking kubernetes client on a thread and hands each new set to the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the client is imported on first use only (local runs without a cluster never import it)
    from kubernetes.client import DiscoveryV1Api

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


class EndpointSet:
    """Replica name -> base URL, with a change notification the hold queue waits on."""

    def __init__(self) -> None:
        self._replicas: dict[str, str] = {}
        self._changed = asyncio.Condition()
        self.version = 0
        self.synced = False  # a source has reported at least once (an empty cluster list counts)

    @property
    def replicas(self) -> Mapping[str, str]:
        return self._replicas

    async def replace(self, replicas: Mapping[str, str]) -> None:
        self.synced = True
        if dict(replicas) == self._replicas:
            return
        added = sorted(set(replicas) - set(self._replicas))
        removed = sorted(set(self._replicas) - set(replicas))
        self._replicas = dict(replicas)
        self.version += 1
        log.info("replicas now %d (added %s, removed %s)", len(replicas), added or "-", removed or "-")
        async with self._changed:
            self._changed.notify_all()

    async def wait_changed(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for any change; whether one came."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
                return True
            except TimeoutError:
                return False


def name_for_url(url: str) -> str:
    return url.rstrip("/").split("://", 1)[-1]


def parse_url_list(text: str) -> dict[str, str]:
    urls = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return {name_for_url(u): u.rstrip("/") for u in urls if u}


class StaticSource:
    def __init__(self, urls: Iterable[str]) -> None:
        self._replicas = {name_for_url(u): u.rstrip("/") for u in urls}

    async def run(self, endpoints: EndpointSet) -> None:
        await endpoints.replace(self._replicas)


class FileSource:
    """Polls the file's modification time; a missing file means no replicas."""

    def __init__(self, path: pathlib.Path, *, interval_s: float = 0.2) -> None:
        self._path = path
        self._interval_s = interval_s

    def _read(self) -> dict[str, str]:
        try:
            return parse_url_list(self._path.read_text())
        except FileNotFoundError:
            return {}

    async def run(self, endpoints: EndpointSet) -> None:
        last: tuple[int, int] | None = None
        while True:
            try:
                stat = self._path.stat()
                current = (stat.st_mtime_ns, stat.st_size)
            except FileNotFoundError:
                current = (0, -1)
            if current != last:
                last = current
                await endpoints.replace(self._read())
            await asyncio.sleep(self._interval_s)


def replicas_from_slices(slices: Iterable[Mapping[str, Any]], *, port_name: str | None) -> dict[str, str]:
    """Ready, non-terminating endpoints of the slices as `{name: http://address:port}`.

    The name is the pod (targetRef) when there is one, so a pod keeps its name across slice rewrites.
    A slice without the named port (or without ports) contributes nothing.
    """
    out: dict[str, str] = {}
    for item in slices:
        ports = item.get("ports") or []
        port = next((p for p in ports if port_name is None or p.get("name") == port_name), None)
        if port is None or port.get("port") is None:
            continue
        for endpoint in item.get("endpoints") or []:
            cond = endpoint.get("conditions") or {}
            # The API says a nil `ready` means ready; `serving` may be true while terminating: not for new work.
            if cond.get("ready") is False or cond.get("terminating") is True:
                continue
            addresses = endpoint.get("addresses") or []
            if not addresses:
                continue
            address = addresses[0]
            host = f"[{address}]" if ":" in address else address
            target = endpoint.get("targetRef") or {}
            name = target.get("name") or f"{address}:{port['port']}"
            out[name] = f"http://{host}:{port['port']}"
    return out


class EndpointSliceSource:
    """Watch the Service's EndpointSlices with the kubernetes client (on a thread) and publish the set."""

    def __init__(self, *, namespace: str, service: str, port_name: str | None, kubeconfig: str | None = None) -> None:
        self._namespace = namespace
        self._service = service
        self._port_name = port_name
        self._kubeconfig = kubeconfig
        self._stop = threading.Event()

    def _api(self) -> DiscoveryV1Api:
        from kubernetes import client, config  # noqa: PLC0415  (local runs without a cluster never import it)

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config(config_file=self._kubeconfig)
        return client.DiscoveryV1Api()

    def _watch(self, loop: asyncio.AbstractEventLoop, endpoints: EndpointSet) -> None:
        from kubernetes import watch  # noqa: PLC0415
        from kubernetes.client import exceptions  # noqa: PLC0415

        api = self._api()
        selector = f"{SERVICE_NAME_LABEL}={self._service}"
        while not self._stop.is_set():
            try:
                listed = api.list_namespaced_endpoint_slice(self._namespace, label_selector=selector)
                slices: dict[str, Any] = {}
                for item in listed.items:
                    obj = api.api_client.sanitize_for_serialization(item)
                    slices[obj["metadata"]["name"]] = obj
                self._publish(loop, endpoints, slices)
                stream = watch.Watch().stream(
                    api.list_namespaced_endpoint_slice,
                    self._namespace,
                    label_selector=selector,
                    # A list always carries its metadata; without it the watch starts from the current state.
                    resource_version=listed.metadata.resource_version if listed.metadata is not None else None,
                    timeout_seconds=60,
                )
                for event in stream:
                    if self._stop.is_set():
                        return
                    obj = api.api_client.sanitize_for_serialization(event["object"])
                    name = obj.get("metadata", {}).get("name")
                    if event["type"] == "DELETED":
                        slices.pop(name, None)
                    elif event["type"] in ("ADDED", "MODIFIED"):
                        slices[name] = obj
                    else:
                        break  # ERROR (e.g. 410 Gone): list again
                    self._publish(loop, endpoints, slices)
            except exceptions.ApiException as error:
                log.warning("EndpointSlice watch failed (%s); retrying in 1s", error.status)
                self._stop.wait(1.0)
            except Exception:  # never let the watch thread die: a dead watch would freeze the replica set
                log.exception("EndpointSlice watch failed; retrying in 1s")
                self._stop.wait(1.0)

    def _publish(self, loop: asyncio.AbstractEventLoop, endpoints: EndpointSet, slices: Mapping[str, Any]) -> None:
        replicas = replicas_from_slices(slices.values(), port_name=self._port_name)
        asyncio.run_coroutine_threadsafe(endpoints.replace(replicas), loop).result(timeout=10)

    async def run(self, endpoints: EndpointSet) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def finish() -> None:
            if not done.done():
                done.set_result(None)

        def target() -> None:
            try:
                self._watch(loop, endpoints)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop may be closed already
                    loop.call_soon_threadsafe(finish)

        # A daemon thread, not the loop's executor: a watch blocked in a read must not hold up shutdown.
        threading.Thread(target=target, name="endpointslice-watch", daemon=True).start()
        try:
            await done
        finally:
            self._stop.set()
