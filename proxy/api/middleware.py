"""The pure-ASGI middleware in front of every route: body-size limit (Content-Length and streamed
size), metrics, one JSON access-log line per request, and a last-resort OpenAI-style 500 for any
unexpected exception (no traceback, which could quote data, reaches a log or a client).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.errors import APIError, BodyTooLarge, error_body
from proxy.logs import log_request
from proxy.metrics import Metrics

log = logging.getLogger("dpicl.app")


class RequestMiddleware:
    """Body limit (Content-Length and streamed size), metrics, access log, last-resort 500."""

    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics, access_log: bool = True):
        self.app = app
        self.limit = limit
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state: dict[str, Any] = scope.setdefault("state", {})
        status = 500
        response_started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
            await send(message)

        async def reply(err: APIError) -> None:
            await send_wrapper({"type": "http.response.start", "status": err.status,
                                "headers": [(b"content-type", b"application/json")]})
            await send_wrapper({"type": "http.response.body",
                                "body": error_body(err.status, err.message, err.code, err.type)})

        try:
            length = _content_length(scope)
            if length is not None and length > self.limit:
                await reply(BodyTooLarge(self.limit))
                return
            received = 0

            async def limited_receive() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.limit:
                        raise BodyTooLarge(self.limit)
                return message

            await self.app(scope, limited_receive, send_wrapper)
        except Exception as exc:  # noqa: BLE001 - last resort; never re-raise (uvicorn logs tracebacks)
            if isinstance(exc, APIError):
                err = exc
            elif isinstance(exc, ValueError) and str(exc).startswith("invalid content-length"):
                err = APIError(400, "invalid Content-Length header", "invalid_header")
            else:
                log.error("unhandled %s on %s %s", type(exc).__name__, scope.get("method"), scope.get("path", "")[:200])
                err = APIError(500, "internal server error", "internal_error")
            if not response_started:
                await reply(err)
            else:
                status = err.status
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            model = state.get("model") or "-"
            self.metrics.requests.labels(path, model, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - started)
            if self.access_log:
                log_request(scope.get("method", "?"), scope.get("path", ""), status, started, state)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                n = int(value)
            except ValueError:
                raise ValueError("invalid content-length") from None
            if n < 0:
                raise ValueError("invalid content-length")
            return n
    return None
