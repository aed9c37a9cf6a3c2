"""The service's error type and OpenAI-style error bodies, raised by serving, auth and the API alike.

Every error answer is ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status.
Messages never echo request bodies or validation inputs: an upload may contain private rows, so
they name fields and reasons only. The FastAPI handlers that answer with these bodies are in
:mod:`proxy.api.errors`.
"""

from __future__ import annotations

from typing import Any

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

_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_budget",
    403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
    408: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error", 415: "invalid_request_error",
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


class BodyTimeout(APIError):
    """The request body did not arrive in time; the connection is closed after the answer."""

    def __init__(self, seconds: float):
        super().__init__(408, f"the request body did not arrive within {seconds:g} seconds", "body_timeout",
                         headers={"Connection": "close"})


def error_body(status: int, message: str, code: str | None = None, type: str | None = None,
               param: str | None = None) -> bytes:
    """The JSON bytes of an OpenAI-style error."""
    return dumps({"error": {
        "message": message,
        "type": type or _TYPES.get(status, "server_error"),
        "param": param,
        "code": code,
    }})
