"""The pure-ASGI middleware in front of every route: body-size limit (Content-Length and streamed
size), body read timeout (408), client disconnects (counted as 499), metrics, one JSON access-log
line per request, and a last-resort OpenAI-style 500 for any unexpected exception (no traceback,
which could quote data, reaches a log or a client).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.api.errors import store_busy_error
from proxy.errors import APIError, BodyTimeout, BodyTooLarge, error_body
from proxy.logs import log_request
from proxy.metrics import Metrics

log = logging.getLogger("dpicl.app")


#: Status recorded for a request whose client went away before the answer was sent (nginx's
#: convention; never sent, since nobody is listening).
CLIENT_CLOSED = 499

_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+: a deadline without an extra task


async def _receive_before(receive: Receive, deadline: float, seconds: float) -> Message:
    """``receive()``, or :class:`BodyTimeout` when the body is not complete by ``deadline``."""
    left = deadline - time.monotonic()
    try:
        if _timeout is not None:
            async with _timeout(max(0.0, left)):
                return await receive()
        return await asyncio.wait_for(receive(), max(0.0, left))
    except (asyncio.TimeoutError, TimeoutError):
        raise BodyTimeout(seconds) from None


class RequestMiddleware:
    """Body limit and read timeout, client disconnects, metrics, access log, last-resort 500.

    ``body_timeout``: seconds from the start of a request by which its whole body must have
    arrived (a client that declares 100 bytes and sends 9 would otherwise hold the connection
    forever); a late body is answered 408 and the connection is closed.
    """

    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics, access_log: bool = True,
                 body_timeout: float | None = 60.0):
        self.app = app
        self.limit = limit
        self.metrics = metrics
        self.access_log = access_log
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state: dict[str, Any] = scope.setdefault("state", {})
        status = 500
        response_started = False
        response_done = False
        disconnected = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, response_started, response_done, disconnected
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                response_started = True
            elif kind == "http.response.body" and not message.get("more_body", False):
                response_done = True
            try:
                await send(message)
            except OSError:  # uvicorn: the client is gone
                disconnected = True
                raise

        async def reply(err: APIError) -> None:
            headers = [(b"content-type", b"application/json")]
            headers += [(k.lower().encode(), v.encode()) for k, v in (err.headers or {}).items()]
            await send_wrapper({"type": "http.response.start", "status": err.status, "headers": headers})
            await send_wrapper({"type": "http.response.body",
                                "body": error_body(err.status, err.message, err.code, err.type)})

        try:
            length = _content_length(scope)
            if length is not None and length > self.limit:
                await reply(BodyTooLarge(self.limit))
                return
            received = 0
            body_complete = scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE") and not length
            deadline = time.monotonic() + self.body_timeout if self.body_timeout else 0.0

            async def guarded_receive() -> Message:
                nonlocal received, body_complete, disconnected
                if body_complete or not self.body_timeout:
                    message = await receive()
                else:
                    message = await _receive_before(receive, deadline, self.body_timeout)
                kind = message["type"]
                if kind == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.limit:
                        raise BodyTooLarge(self.limit)
                    if not message.get("more_body", False):
                        body_complete = True
                elif kind == "http.disconnect":
                    disconnected = True
                return message

            await self.app(scope, guarded_receive, send_wrapper)
            if disconnected and not response_done:
                status = CLIENT_CLOSED
        except Exception as exc:  # noqa: BLE001 - last resort; never re-raise (uvicorn logs tracebacks)
            if disconnected or isinstance(exc, ClientDisconnect):
                # Not a server error: the client went away (while sending its body, or before the
                # answer was complete). Nobody is listening, so nothing is sent.
                status = CLIENT_CLOSED
                log.info("client disconnected on %s %s", scope.get("method"), scope.get("path", "")[:200])
                return
            if isinstance(exc, APIError):
                err = exc
            elif isinstance(exc, ValueError) and str(exc).startswith("invalid content-length"):
                err = APIError(400, "invalid Content-Length header", "invalid_header")
            elif (busy := store_busy_error(exc)) is not None:
                log.warning("store busy (%s) on %s %s", type(exc).__name__, scope.get("method"),
                            scope.get("path", "")[:200])
                err = busy
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
