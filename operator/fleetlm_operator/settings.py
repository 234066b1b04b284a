"""The operator's own settings, read once from the environment (the Helm chart sets them).

Settings are plain values: nothing here talks to the cluster. Every variable is optional; the defaults
are what a `helm install` with default values gives.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import uuid
from collections.abc import Mapping


def _bool(value: str, *, name: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _int(value: str, *, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


@dataclasses.dataclass(frozen=True, slots=True)
class OperatorSettings:
    runtime_image: str = "fleetlm/runtime:0.1.0"  # used when an LLMService names no image
    router_image: str = "fleetlm/operator:0.1.0"  # the router ships in the operator's (torch-free) image
    namespace: str = "default"  # where the operator runs (its leader-election Lease lives there)
    leader_election: bool = True
    lease_name: str = "fleetlm-operator"
    identity: str = ""  # this replica's name in the Lease; pod name + a random suffix
    lease_duration_s: int = 15  # a standby takes over this long after the leader stops renewing
    metrics_port: int = 8081  # the operator's own /metrics; 0 disables
    health_port: int = 8080  # kopf's liveness endpoint /healthz; 0 disables

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorSettings:
        env = os.environ if env is None else env
        defaults = cls()
        identity = (
            env.get("FLEETLM_OPERATOR_IDENTITY")
            or f"{env.get('POD_NAME') or socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        )
        return cls(
            runtime_image=env.get("FLEETLM_RUNTIME_IMAGE", defaults.runtime_image),
            router_image=env.get("FLEETLM_ROUTER_IMAGE", defaults.router_image),
            namespace=env.get("FLEETLM_OPERATOR_NAMESPACE") or env.get("POD_NAMESPACE") or defaults.namespace,
            leader_election=_bool(env.get("FLEETLM_LEADER_ELECTION", "true"), name="FLEETLM_LEADER_ELECTION"),
            lease_name=env.get("FLEETLM_LEASE_NAME", defaults.lease_name),
            identity=identity,
            lease_duration_s=_int(
                env.get("FLEETLM_LEASE_DURATION_S", str(defaults.lease_duration_s)), name="FLEETLM_LEASE_DURATION_S"
            ),
            metrics_port=_int(env.get("FLEETLM_METRICS_PORT", str(defaults.metrics_port)), name="FLEETLM_METRICS_PORT"),
            health_port=_int(env.get("FLEETLM_HEALTH_PORT", str(defaults.health_port)), name="FLEETLM_HEALTH_PORT"),
        )
