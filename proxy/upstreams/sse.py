"""Checking an upstream's event stream before relaying it: :class:`SSEChecker` splits the bytes into
whole server-sent events, lets well-formed ones through unchanged and raises :class:`StreamError` for
anything else (a line that is not an SSE field, a ``data:`` payload that is not a JSON object or
``[DONE]``, a stream that stops before ``[DONE]``).

Without the check a 200 answer whose body is not an event stream would be relayed to the client as
a successful (empty or garbled) completion; with it the client gets an in-band error event.
"""

from __future__ import annotations

import re
from typing import AsyncIterator

from proxy.upstreams.base import StreamError, loads

#: An event ends at a blank line; the SSE spec allows CRLF, LF and CR line ends.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE = re.compile(rb"\r\n|\n|\r")
#: The fields of the SSE spec; any other non-comment line means the body is not an event stream.
_FIELDS = frozenset({b"data", b"event", b"id", b"retry"})
#: Largest partial event buffered while waiting for its end (an endless line is not an event stream).
MAX_EVENT_BYTES = 4 * 1024 * 1024


class SSEChecker:
    """Incremental checker of one upstream stream; ``feed`` returns the whole events seen so far."""

    def __init__(self, name: str):
        self.name = name
        self.done = False
        self._buf = b""

    def _invalid(self, what: str) -> StreamError:
        return StreamError(502, f"upstream {self.name!r} sent an invalid event stream ({what})")

    def _check_event(self, event: bytes) -> None:
        data: list[bytes] = []
        for line in _LINE.split(event):
            if not line or line.startswith(b":"):
                continue  # blank or comment (keep-alive)
            field, _, value = line.partition(b":")
            if field not in _FIELDS:
                raise self._invalid("a line that is not an SSE field")
            if field == b"data":
                data.append(value[1:] if value.startswith(b" ") else value)
        if not data:
            return
        payload = b"\n".join(data)
        if payload.strip() == b"[DONE]":
            self.done = True
            return
        try:
            obj = loads(payload)
        except ValueError:
            raise self._invalid("data that is not JSON") from None
        if not isinstance(obj, dict):
            raise self._invalid("data that is not a JSON object")

    def feed(self, chunk: bytes) -> bytes:
        """The complete, checked events in ``chunk`` plus what was buffered (maybe ``b""``)."""
        buf = self._buf + chunk
        end = 0
        for match in _EVENT_END.finditer(buf):
            self._check_event(buf[end:match.start()])
            end = match.end()
        self._buf = buf[end:]
        if len(self._buf) > MAX_EVENT_BYTES:
            raise self._invalid("an event without an end")
        return buf[:end]

    def finish(self) -> bytes:
        """The last (unterminated) event; raises when the stream ended before ``[DONE]``."""
        rest, self._buf = self._buf, b""
        if rest.strip():
            self._check_event(rest)
        if not self.done:
            raise StreamError(502, f"upstream {self.name!r} closed the stream before it finished")
        return rest + b"\n\n" if rest.strip() else b""


async def checked(stream: AsyncIterator[bytes], name: str) -> AsyncIterator[bytes]:
    """``stream`` (raw SSE bytes) relayed in whole events, checked by an :class:`SSEChecker`."""
    checker = SSEChecker(name)
    async for chunk in stream:
        out = checker.feed(chunk)
        if out:
            yield out
    tail = checker.finish()
    if tail:
        yield tail
