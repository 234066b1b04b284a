"""The route table and the middleware that answers every error in OpenAI's shape.

`setup_routes(app)` is the whole HTTP surface in one place. The middleware turns `schemas.APIError`,
aiohttp's own HTTP errors (404, 405, 413) and anything unexpected into `{"error": {...}}` bodies, and
counts refusals; a bug in a handler becomes a logged 500, never a crashed process.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from fleetlm_runtime import contract
from fleetlm_runtime.server import admin, health, openai, schemas

log = logging.getLogger(__name__)


def setup_routes(app: web.Application) -> None:
    app.router.add_post(contract.PATH_COMPLETIONS, openai.completions)
    app.router.add_post(contract.PATH_CHAT_COMPLETIONS, openai.chat_completions)
    app.router.add_get(contract.PATH_MODELS, openai.list_models)
    app.router.add_get(contract.PATH_HEALTH, health.health)
    app.router.add_get(contract.PATH_READY, health.ready)
    app.router.add_get(contract.PATH_METRICS, health.metrics)
    app.router.add_get(contract.PATH_ADMIN_CONFIG, admin.get_config)
    app.router.add_put(contract.PATH_ADMIN_CONFIG, admin.put_config)
    app.router.add_get(contract.PATH_ADMIN_USAGE, admin.get_usage)


_HTTP_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except schemas.APIError as error:
        return error.response()
    except web.HTTPException as error:
        if error.status < 400:
            raise
        body = schemas.APIError(
            error.status,
            error.text or error.reason,
            type=_HTTP_TYPES.get(error.status, "invalid_request_error"),
        ).body()
        headers = {k: v for k, v in error.headers.items() if k.lower() in ("allow", "retry-after")}
        return web.json_response(body, status=error.status, headers=headers)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        body = schemas.APIError(500, "internal server error", type="internal_server_error").body()
        return web.json_response(body, status=500)
