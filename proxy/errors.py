"""OpenAI-style error bodies for every error path of the service.

Every error answer is ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status.
Handlers never echo request bodies or validation inputs: an upload may contain private rows, so
messages name fields and reasons only. Unexpected exceptions become a bare 500 and are logged by
type name only (their text could quote data).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from proxy.config import format_validation_errors

try:
    import orjson

    def dumps(obj: Any) -> bytes:
        """Fast JSON encoding (orjson when installed)."""
        return orjson.dumps(obj)

    loads = orjson.loads
    JSONDecodeError: type[Exception] = orjson.JSONDecodeError
except ImportError:  # pragma: no cover - orjson is optional
    import json

    def dumps(obj: Any) -> bytes:
        """Fast JSON encoding (orjson when installed)."""
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

    loads = json.loads
    JSONDecodeError = json.JSONDecodeError

log = logging.getLogger("dpicl.errors")

_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_budget",
    403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
    409: "conflict_error", 413: "invalid_request_error", 415: "invalid_request_error",
    422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 502: "upstream_error",
    503: "service_unavailable", 504: "upstream_timeout",
}


class APIError(Exception):
    """An error answered as an OpenAI-style JSON body. ``message`` must not contain private text."""

    def __init__(self, status: int, message: str, code: str | None = None, type: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.headers = headers


class BodyTooLarge(APIError):
    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than the limit of {limit} bytes", "body_too_large")


def error_body(status: int, message: str, code: str | None = None, type: str | None = None,
               param: str | None = None) -> bytes:
    """The JSON bytes of an OpenAI-style error."""
    return dumps({"error": {
        "message": message,
        "type": type or _TYPES.get(status, "server_error"),
        "param": param,
        "code": code,
    }})


def error_response(status: int, message: str, code: str | None = None, type: str | None = None,
                   param: str | None = None, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(status, message, code, type, param), status_code=status,
                    media_type="application/json", headers=headers)


def not_found_model(model: str) -> APIError:
    # Model names come from the client (not private data); cap the length anyway.
    shown = model if len(model) <= 128 else model[:128] + "..."
    return APIError(404, f"the model '{shown}' does not exist or you do not have access to it",
                    "model_not_found", param="model")


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
        elif status == 405:
            message = f"method {request.method} is not allowed on {request.url.path[:200]}"
        else:
            message = str(exc.detail) if isinstance(exc.detail, str) else "request failed"
        return error_response(status, message, code=str(status), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # The exception's text may quote data: log its type only.
        log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path[:200])
        return error_response(500, "internal server error", "internal_error")
