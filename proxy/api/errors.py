"""The FastAPI exception handlers: every error, including the framework's own (validation, unknown
route, wrong method) and unexpected exceptions, answered as an OpenAI-style body. Unexpected
exceptions become a bare 500 and are logged by type name only (their text could quote data), except
a store that did not answer in time (a lock wait, a Redis timeout): 503 with ``Retry-After``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

from proxy.config import format_validation_errors
from proxy.errors import APIError, error_body
from proxy.store import busy_reason

log = logging.getLogger("dpicl.errors")

#: Retry-After (seconds) of a 503 for a store that did not answer in time: lock holders keep the
#: lock for short, bounded steps (docs/stores.md), so a retry soon is likely to succeed.
STORE_RETRY_AFTER = 2


def error_response(status: int, message: str, code: str | None = None, type: str | None = None,
                   param: str | None = None, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(status, message, code, type, param), status_code=status,
                    media_type="application/json", headers=headers)


def store_busy_error(exc: BaseException) -> APIError | None:
    """503 + ``Retry-After`` for a store that did not answer in time (None for other errors)."""
    reason = busy_reason(exc)
    if reason is None:
        return None
    return APIError(503, f"{reason}; retry in a few seconds", "store_busy",
                    headers={"Retry-After": str(STORE_RETRY_AFTER)})


def not_found_model(model: str) -> APIError:
    # Model names come from the client (not private data); cap the length anyway.
    shown = model if len(model) <= 128 else model[:128] + "..."
    return APIError(404, f"the model '{shown}' does not exist or you do not have access to it",
                    "model_not_found", param="model")


#: Methods probed for a 405's ``Allow`` header.
_METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app answers on the request's path, sorted.

    Found by asking the router whether each method would fully match (FastAPI nests included
    routers, so the flat route list does not show them all)."""
    routes = request.app.router.routes
    allowed = []
    for method in _METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in routes):
            allowed.append(method)
    return allowed


def install_error_handlers(app: FastAPI) -> None:
    """Register handlers that turn every exception into an OpenAI-style body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc.status, exc.message, exc.code, exc.type, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        # Pydantic's default 422 body includes the offending input: never send it back.
        errors = list(exc.errors())
        param = None
        if errors:
            loc = [str(x) for x in errors[0].get("loc", ()) if x not in ("body", "query", "path")]
            param = ".".join(loc) or None
        return error_response(400, "invalid request: " + format_validation_errors(errors),
                              "invalid_request", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        status = exc.status_code
        if status == 404:
            message = f"no route {request.method} {request.url.path[:200]}"
        headers = getattr(exc, "headers", None)
        if status == 405:
            message = f"method {request.method} is not allowed on {request.url.path[:200]}"
            # Starlette names the methods of the first route with this path only; every method
            # of every route with this path is allowed (RFC 9110: Allow lists them all).
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
        elif status != 404:
            message = str(exc.detail) if isinstance(exc.detail, str) else "request failed"
        return error_response(status, message, code=str(status), headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        busy = store_busy_error(exc)
        if busy is not None:  # a lock or store timeout: nothing was written, retrying is safe
            log.warning("store busy (%s) on %s %s", type(exc).__name__, request.method, request.url.path[:200])
            return error_response(busy.status, busy.message, busy.code, busy.type, headers=busy.headers)
        # The exception's text may quote data: log its type only.
        log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path[:200])
        return error_response(500, "internal server error", "internal_error")
