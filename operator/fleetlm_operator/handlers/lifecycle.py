"""Operator start-up and shutdown: kopf settings, API clients, metrics server, leader election.

Start-up blocks until this replica holds the leader Lease, so a standby replica handles nothing; a
replica that loses the Lease stops itself (its pod restarts as a standby) rather than risk two writers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

import kopf
from kubernetes import client, config

from fleetlm_operator import metrics
from fleetlm_operator import settings as settings_module
from fleetlm_operator.act import apply, leader
from fleetlm_operator.api import names
from fleetlm_operator.handlers import context

_background: set[asyncio.Task[None]] = set()


def _api_client() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        # The client reads $KUBECONFIG when it is imported; read it now so a later setting counts.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = 32  # handlers run in kopf's thread pool concurrently
    return client.ApiClient(configuration)


def _stop_self() -> None:
    # A replica without the Lease must not act: handlers refuse at once (context.get reads is_leader), and
    # the process ends; Kubernetes restarts it as a standby, which takes the Lease again when it is free.
    # Stepping down in-process instead would leave kopf running its handlers' retries and writing its
    # progress annotations on objects another leader now owns. (client-go's controllers exit the same way.)
    metrics.IS_LEADER.set(0)
    os.kill(os.getpid(), signal.SIGTERM)


def _hold_ended(task: asyncio.Task[None]) -> None:
    _background.discard(task)
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:  # a bug in the renewal loop: never keep acting without a Lease being renewed
        logging.getLogger(__name__).error("the leader-election renewal failed; stepping down", exc_info=error)
        _stop_self()


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster service account first, else $KUBECONFIG as it is now (not when a client was imported)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    operator_settings = settings_module.OperatorSettings.from_env()
    # Keep kopf's bookkeeping under our own group rather than kopf.zalando.org.
    settings.persistence.finalizer = names.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=names.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=names.GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    settings.execution.max_workers = 16
    settings.execution.default_backoff = 10  # kopf waits 60 s after an unexpected error by default
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    api_client = await asyncio.to_thread(_api_client)
    ctx = context.OperatorContext(
        settings=operator_settings, api_client=api_client, applier=await asyncio.to_thread(apply.Applier, api_client)
    )
    if operator_settings.metrics_port:
        metrics.serve(operator_settings.metrics_port)
    if operator_settings.leader_election:
        lease = leader.LeaseConfig(
            name=operator_settings.lease_name,
            namespace=operator_settings.namespace,
            identity=operator_settings.identity,
            lease_duration_s=operator_settings.lease_duration_s,
            renew_period_s=operator_settings.lease_duration_s / 5,
            retry_period_s=min(1.0, operator_settings.lease_duration_s / 10),
        )
        elector = leader.LeaseElector(lease, api=client.CoordinationV1Api(api_client))
        await elector.acquire()
        ctx.elector = elector
        task = asyncio.create_task(elector.hold(on_lost=_stop_self))
        _background.add(task)
        task.add_done_callback(_hold_ended)
    metrics.IS_LEADER.set(1)
    memo[context.MEMO_KEY] = ctx
    logger.info(
        "fleetlm-operator started as %s (runtime image %s)", operator_settings.identity, operator_settings.runtime_image
    )


@kopf.on.probe(id="leader")
def probe_leader(memo: kopf.Memo, **_: Any) -> bool:
    ctx = memo.get(context.MEMO_KEY)
    return bool(ctx is not None and (ctx.elector is None or ctx.elector.is_leader))


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    for task in list(_background):
        task.cancel()
    ctx = memo.get(context.MEMO_KEY)
    if isinstance(ctx, context.OperatorContext) and ctx.elector is not None:
        await asyncio.to_thread(ctx.elector.release)
    metrics.IS_LEADER.set(0)
