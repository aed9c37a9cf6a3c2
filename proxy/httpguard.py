"""A bound on how long a connection may take to send a request's headers (slowloris defence).

uvicorn closes idle kept-alive connections (``timeout_keep_alive``) but has no deadline for the
request head itself: a client that opens a connection and sends one header byte every few seconds
holds it (and a file descriptor) forever, and a few hundred such clients exhaust the server. The
body has its own deadline (``server.body_timeout``, in :mod:`proxy.api.middleware`); this module
covers what comes before the app sees the request.

:func:`http_protocol` returns uvicorn's own HTTP protocol class (httptools when installed, else
h11, as uvicorn's ``auto`` picks) extended with one timer per connection: armed when the connection
opens and again when an answer completes on a kept-alive connection, cancelled as soon as a new
request's headers are complete. When it fires the server answers 408 (``Connection: close``) and
closes the connection. The check is protocol-neutral: uvicorn starts a new request/response cycle
exactly when a request's headers are complete, so "the current cycle changed" means "headers done".
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Callable

from uvicorn.protocols.http.h11_impl import H11Protocol

from proxy.errors import error_body

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is optional for uvicorn
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

__all__ = ["GuardedH11Protocol", "GuardedHttpToolsProtocol", "http_protocol"]


def _timeout_response(seconds: float) -> bytes:
    body = error_body(408, f"the request headers did not arrive within {seconds:g} seconds", "header_timeout")
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n" % len(body)) + body


class _HeaderDeadline:
    """Mixin for a uvicorn HTTP protocol: close a connection whose request head is not complete
    ``header_timeout`` seconds after the connection opened or the previous answer completed."""

    # Set by the uvicorn protocol class this is mixed into.
    cycle: Any
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    def __init__(self, *args: Any, header_timeout: float = 10.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        self._waiting_after: Any = None  # the cycle that was current when the timer was armed

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._waiting_after = self.cycle
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.write(_timeout_response(self.header_timeout))
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        if self._header_timer is not None and self.cycle is not self._waiting_after:
            self._disarm_header_timer()  # a new request's headers are complete

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        # Waiting for the next request (no pipelined one already parsed): its head gets a deadline.
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)  # type: ignore[misc]


class GuardedH11Protocol(_HeaderDeadline, H11Protocol):
    """uvicorn's h11 protocol with a request-head deadline."""


if HttpToolsProtocol is not None:
    class GuardedHttpToolsProtocol(_HeaderDeadline, HttpToolsProtocol):
        """uvicorn's httptools protocol with a request-head deadline."""
else:  # pragma: no cover
    GuardedHttpToolsProtocol = None  # type: ignore[assignment,misc]


def http_protocol(header_timeout: float) -> Callable[..., asyncio.Protocol]:
    """The ``http`` argument for ``uvicorn.run`` / ``uvicorn.Config``: uvicorn's protocol with the
    head deadline. A ``functools.partial`` of a module-level class, so it pickles for ``--workers``."""
    cls = GuardedHttpToolsProtocol if GuardedHttpToolsProtocol is not None else GuardedH11Protocol
    return functools.partial(cls, header_timeout=header_timeout)
