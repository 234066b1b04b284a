"""Leader election on a coordination.k8s.io Lease, so that of N operator replicas exactly one acts.

kopf's own peering freezes *every* operator when two share a priority, which is what replicas of one
Deployment do; the Kubernetes convention (client-go's leaderelection) is a Lease instead, and that is
what this module implements: acquire when the Lease is free or expired, renew every `renew_period_s`,
and step down when no renewal has succeeded for `renew_deadline_s`, which is shorter than the Lease's
duration: the leader stops acting *before* another candidate may take the Lease, so there are never two
leaders, whatever the API server does meanwhile (down, refusing connections, hanging). Every request has
a timeout, and any failure of a renewal (an ApiException, a refused connection, a timeout, a bug) is
logged and retried, never allowed to end the renewal silently. Writes use the Lease's resourceVersion, so
two candidates racing for an expired Lease cannot both win.

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
    # client-go's default ratio (10 s of 15): the leader gives up a third of the duration before anyone
    # else may take the Lease, which leaves its in-flight writes time to land or fail.
    renew_deadline_s: float | None = None

    @property
    def deadline_s(self) -> float:
        return self.renew_deadline_s if self.renew_deadline_s is not None else self.lease_duration_s * 2 / 3

    @property
    def request_timeout_s(self) -> float:
        """Per API request: a hung connection must not hold an attempt past the renew deadline."""
        return max(1.0, min(self.renew_period_s, self.deadline_s / 3))


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
        self.observed_holder: str | None = None  # the holder the last read of the Lease showed

    def _try_acquire_or_renew(self) -> bool:
        """One attempt; True when we hold the lease afterwards. Runs in a worker thread."""
        cfg = self.config
        now = _now()
        try:
            lease = self._api.read_namespaced_lease(cfg.name, cfg.namespace, _request_timeout=cfg.request_timeout_s)
        except exceptions.ApiException as error:
            if error.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=cfg.name, namespace=cfg.namespace),
                spec=client.V1LeaseSpec(
                    holder_identity=cfg.identity,
                    lease_duration_seconds=cfg.lease_duration_s,
                    acquire_time=now,
                    renew_time=now,
                    lease_transitions=0,
                ),
            )
            try:
                self._api.create_namespaced_lease(cfg.namespace, body, _request_timeout=cfg.request_timeout_s)
            except exceptions.ApiException as create_error:
                if create_error.status == 409:  # another candidate created it first
                    return False
                raise
            return True
        spec = lease.spec or client.V1LeaseSpec()
        self.observed_holder = spec.holder_identity
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
        self.observed_holder = cfg.identity if ours else None  # a 409 below: the next read says who won
        try:
            # replace() carries metadata.resourceVersion: a concurrent writer makes this a 409.
            self._api.replace_namespaced_lease(cfg.name, cfg.namespace, lease, _request_timeout=cfg.request_timeout_s)
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
                    logger.info(
                        "acquired leadership of lease %s/%s as %s",
                        self.config.namespace,
                        self.config.name,
                        self.config.identity,
                    )
                    return
            except Exception as error:  # the API server down or refusing: keep trying, never crash the start
                logger.warning(
                    "leader election: lease %s/%s unavailable: %s",
                    self.config.namespace,
                    self.config.name,
                    _describe(error),
                )
            if not announced:
                logger.info("another operator replica leads; standing by")
                announced = True
            await asyncio.sleep(self.config.retry_period_s)

    async def hold(self, *, on_lost: Callable[[], None]) -> None:
        """Renew every `renew_period_s` (failed attempts again every `retry_period_s`); step down
        (`is_leader` False, then `on_lost` once) when another replica holds the Lease, or when no renewal
        succeeded for `deadline_s`. No error ends this loop other than through that step-down."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        # The Lease's renewTime is the moment an attempt *started* (it writes `now` then), so the deadline
        # counts from there, not from when the answer came back.
        last_renewed = loop.time()
        failures = 0
        while True:
            left = last_renewed + cfg.deadline_s - loop.time()
            await asyncio.sleep(max(0.0, min(cfg.retry_period_s if failures else cfg.renew_period_s, left)))
            started = loop.time()
            try:
                # An attempt may not outlive the deadline, even if its requests hang past their timeouts.
                renewed = await asyncio.wait_for(
                    asyncio.to_thread(self._try_acquire_or_renew),
                    timeout=max(0.1, last_renewed + cfg.deadline_s - started),
                )
                error_text = "" if renewed else f"the Lease is held by {self.observed_holder!r}"
            except Exception as error:  # not only ApiException: refused connections, timeouts, TLS, bugs
                renewed, error_text = False, _describe(error)
            if renewed:
                if failures:
                    logger.info(
                        "leader election: lease %s/%s renewed again after %d failed attempts",
                        cfg.namespace,
                        cfg.name,
                        failures,
                    )
                failures = 0
                last_renewed = started
                continue
            failures += 1
            since = loop.time() - last_renewed
            taken = self.observed_holder not in (None, cfg.identity)
            if taken or since >= cfg.deadline_s:
                self.is_leader = False
                logger.error(
                    "lost leadership of lease %s/%s after %.1fs without renewal (%s); stepping down",
                    cfg.namespace,
                    cfg.name,
                    since,
                    error_text,
                )
                on_lost()
                return
            logger.warning(
                "leader election: renewal of lease %s/%s failed (%d in a row, %.1fs since the last "
                "renewal, stepping down at %.1fs): %s",
                cfg.namespace,
                cfg.name,
                failures,
                since,
                cfg.deadline_s,
                error_text,
            )

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
        except Exception as error:  # the API server may be down at shutdown: the Lease then just expires
            logger.warning("could not release lease %s/%s: %s", cfg.namespace, cfg.name, _describe(error))
        self.is_leader = False


def _describe(error: BaseException) -> str:
    if isinstance(error, exceptions.ApiException):
        return f"{error.status} {error.reason}"
    return f"{type(error).__name__}: {error}"
