"""Who may do what: the admin bearer token, and the QoS class a request runs in.

The admin token is compared in constant time (`hmac.compare_digest`); without a configured token the
admin API is closed, never open. A request's class comes from its API key (the default class without a
known key; 401 where keys are required); a client may name a class itself (header or body field) only
where the config allows it, and only one no better than its key's (403 otherwise, `qos.may_choose`), so
nobody raises their own priority by adding a header. This module must never log a key or a token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import pathlib

from aiohttp import web

from fleetlm_runtime import config as config_mod
from fleetlm_runtime import contract
from fleetlm_runtime import qos as qos_mod
from fleetlm_runtime.server import schemas

TENANT_DIGEST_CHARS = 12  # 48 bits of SHA-256: distinct for any real key file, short enough for a label


def read_token_file(path: str | pathlib.Path) -> str:
    """The token in a file (a mounted Secret), stripped of surrounding whitespace; refuses an empty one."""
    try:
        token = pathlib.Path(path).read_text(encoding="utf-8").strip()
    except OSError as error:
        raise config_mod.ConfigError(f"admin token file {path}: {error.strerror or error}") from None
    if not token:
        raise config_mod.ConfigError(f"admin token file {path} is empty")
    return token


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def check_admin(request: web.Request, token: str | None) -> None:
    """Raise a 403 when no token is configured, a 401 when the request lacks the right one."""
    if token is None:
        raise schemas.APIError(
            403,
            "the admin API is disabled: start the runtime with --admin-token-file",
            type="permission_error",
            reason=contract.REJECT_UNAUTHORIZED,
        )
    given = bearer_token(request)
    if given is None or not hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8")):
        raise schemas.APIError(
            401,
            "a valid admin bearer token is required",
            type="authentication_error",
            code="invalid_api_key",
            reason=contract.REJECT_UNAUTHORIZED,
            headers={"WWW-Authenticate": 'Bearer realm="fleetlm-admin"'},
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Client:
    """Who sent a request, as far as serving cares."""

    qos_class: str
    key_id: str = ""  # a digest of the client's known API key ("" without one): a cache salt, never the key

    @property
    def tenant(self) -> str:
        """Who to share fairly with and bill: a short digest of a key in the key file, or one fold value for
        everyone else, so the label stays bounded by the key file. Never the key itself."""
        return self.key_id[:TENANT_DIGEST_CHARS] if self.key_id else contract.TENANT_OTHER


def resolve_client(
    request: web.Request,
    *,
    body_class: str | None,
    qos: config_mod.QoSSettings,
    api_keys: dict[str, str],
) -> Client:
    """The class this request runs in: its API key's class (the default class without a known key); a
    class the client names itself only where the config allows it, and never one above that."""
    key_class: str | None = None
    key_id = ""
    key = bearer_token(request)
    if key is not None and api_keys:
        key_class = _lookup_key(key, api_keys)
        if key_class is not None:
            key_id = hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]
    if key_class is None and qos.require_api_key:
        raise schemas.APIError(
            401,
            "a valid API key is required (Authorization: Bearer <key>)",
            type="authentication_error",
            code="invalid_api_key",
            reason=contract.REJECT_UNAUTHORIZED,
            headers={"WWW-Authenticate": 'Bearer realm="fleetlm"'},
        )
    entitled = key_class or qos.default_class
    requested = request.headers.get(contract.HEADER_QOS_CLASS) or body_class
    if requested is None or requested == entitled:
        return Client(qos_class=entitled, key_id=key_id)
    if not qos.allow_class_header:
        raise schemas.invalid(
            contract.FIELD_QOS_CLASS,
            "this server does not let clients choose their QoS class; it follows the API key",
        )
    classes = qos.by_name()
    if requested not in classes:
        names = ", ".join(c.name for c in qos.classes)
        raise schemas.invalid(contract.FIELD_QOS_CLASS, f"unknown QoS class {requested[:64]!r}; one of: {names}")
    if not qos_mod.may_choose(classes[entitled], classes[requested]):
        raise schemas.APIError(
            403,
            f"QoS class {requested!r} is above the class this client is entitled to ({entitled!r}); "
            "a client may only lower its class",
            type="permission_error",
            code="qos_class_not_allowed",
            param=contract.FIELD_QOS_CLASS,
            reason=contract.REJECT_UNAUTHORIZED,
        )
    return Client(qos_class=requested, key_id=key_id)


def _lookup_key(key: str, api_keys: dict[str, str]) -> str | None:
    # Constant-time over every configured key, so response timing does not reveal a key's prefix.
    found: str | None = None
    encoded = key.encode("utf-8")
    for candidate, qos_class in api_keys.items():
        if hmac.compare_digest(encoded, candidate.encode("utf-8")):
            found = qos_class
    return found
