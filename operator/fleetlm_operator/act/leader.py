"""Leader election on a coordination.k8s.io Lease, so that of N operator replicas exactly one acts.

kopf's own peering freezes *every* operator when two share a priority, which is what replicas of one
Deployment do; the Kubernetes convention (client-go's leaderelection) is a Lease instead, and that is
what this module implements: acquire when the Lease is free or expired, renew every `renew_period_s`,
and report loss when renewal fails for longer than `lease_duration_s`. Writes use the Lease's
resourceVersion, so two candidates racing for an expired Lease cannot both win.

This module talks to the API server (through the `kubernetes` client, in a worker thread); the decision
of what a lost lease means for the process lives with the caller.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
from collections.abc import Callable

from kubernetes import client
from kubernetes.client import exceptions

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class LeaseConfig:
    name: str
    namespace: str
    identity: str
    lease_duration_s: int = 15
    renew_period_s: float = 5.0
    retry_period_s: float = 2.0


def _now() -> datetime.datetime:
    return datetime.datetime.now(tz=datetime.UTC)


def _expired(lease: client.V1Lease, *, now: datetime.datetime) -> bool:
    spec = lease.spec
    if spec is None or not spec.holder_identity:
        return True
    renewed = spec.renew_time or spec.acquire_time
    if renewed is None:
        return True
    if renewed.tzinfo is None:
        renewed = renewed.replace(tzinfo=datetime.UTC)
    return now > renewed + datetime.timedelta(seconds=spec.lease_duration_seconds or 0)


class LeaseElector:
    def __init__(self, config: LeaseConfig, *, api: client.CoordinationV1Api | None = None) -> None:
        self.config = config
        self._api = api or client.CoordinationV1Api()
        self.is_leader = False

    def _try_acquire_or_renew(self) -> bool:
        """One attempt; True when we hold the lease afterwards. Runs in a worker thread."""
        cfg = self.config
        now = _now()
        try:
            lease = self._api.read_namespaced_lease(cfg.name, cfg.namespace)
        except exceptions.ApiException as error:
            if error.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=cfg.name, namespace=cfg.namespace),
                spec=client.V1LeaseSpec(holder_identity=cfg.identity, lease_duration_seconds=cfg.lease_duration_s,
                                        acquire_time=now, renew_time=now, lease_transitions=0))
            try:
                self._api.create_namespaced_lease(cfg.namespace, body)
            except exceptions.ApiException as create_error:
                if create_error.status == 409:  # another candidate created it first
                    return False
                raise
            return True
        spec = lease.spec or client.V1LeaseSpec()
        ours = spec.holder_identity == cfg.identity
        if not ours and not _expired(lease, now=now):
            return False
        if not ours:
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
            spec.acquire_time = now
        spec.holder_identity = cfg.identity
        spec.lease_duration_seconds = cfg.lease_duration_s
        spec.renew_time = now
        lease.spec = spec
        try:
            # replace() carries metadata.resourceVersion: a concurrent writer makes this a 409.
            self._api.replace_namespaced_lease(cfg.name, cfg.namespace, lease)
        except exceptions.ApiException as error:
            if error.status == 409:
                return False
            raise
        return True

    async def acquire(self) -> None:
        """Wait until this candidate holds the lease."""
        announced = False
        while True:
            try:
                if await asyncio.to_thread(self._try_acquire_or_renew):
                    self.is_leader = True
                    logger.info("acquired leadership of lease %s/%s as %s", self.config.namespace,
                                self.config.name, self.config.identity)
                    return
            except exceptions.ApiException as error:
                logger.warning("leader election: lease %s/%s unavailable: %s", self.config.namespace,
                               self.config.name, error.reason)
            if not announced:
                logger.info("another operator replica leads; standing by")
                announced = True
            await asyncio.sleep(self.config.retry_period_s)

    async def hold(self, *, on_lost: Callable[[], None]) -> None:
        """Renew until renewal has failed for a whole lease duration, then call `on_lost` once."""
        last_renewed = asyncio.get_running_loop().time()
        while True:
            await asyncio.sleep(self.config.renew_period_s)
            try:
                renewed = await asyncio.to_thread(self._try_acquire_or_renew)
            except exceptions.ApiException as error:
                logger.warning("leader election: renewal failed: %s", error.reason)
                renewed = False
            now = asyncio.get_running_loop().time()
            if renewed:
                last_renewed = now
                continue
            if now - last_renewed >= self.config.lease_duration_s:
                self.is_leader = False
                logger.error("lost leadership of lease %s/%s", self.config.namespace, self.config.name)
                on_lost()
                return

    def release(self) -> None:
        """Give the lease up on a clean shutdown so a standby takes over at once, not after expiry."""
        if not self.is_leader:
            return
        cfg = self.config
        try:
            lease = self._api.read_namespaced_lease(cfg.name, cfg.namespace)
            if lease.spec is not None and lease.spec.holder_identity == cfg.identity:
                lease.spec.holder_identity = None
                lease.spec.renew_time = None
                self._api.replace_namespaced_lease(cfg.name, cfg.namespace, lease)
        except exceptions.ApiException as error:
            logger.warning("could not release lease %s/%s: %s", cfg.namespace, cfg.name, error.reason)
        self.is_leader = False
