"""The Secret holding the bearer token of the runtime's admin endpoint.

This module decides the Secret's name, key and shape. The token itself is an argument: making one is
the caller's job (`secrets.token_urlsafe(32)`), and the caller creates the Secret only when it is
missing, so reconciling never rotates a token the pods already use. It never talks to a cluster.
"""

from __future__ import annotations

import base64
from typing import Any

from fleetlm_operator.api import models
from fleetlm_operator.builders import meta


def build_admin_token_secret(svc: models.LLMService, *, token: str) -> dict[str, Any]:
    if not token:
        raise ValueError("the admin token may not be empty: the admin endpoint is never open without one")
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta.object_meta(svc, meta.admin_secret_name(svc)),
        "type": "Opaque",
        "data": {meta.ADMIN_TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


def read_admin_token(secret: dict[str, Any]) -> str:
    """The token from a Secret as the API server returns it (base64 `data`)."""
    return base64.b64decode(secret["data"][meta.ADMIN_TOKEN_KEY]).decode()
