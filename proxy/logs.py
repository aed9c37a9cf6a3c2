"""Structured JSON logs: one line per request, never bodies, never dataset text.

A request line holds method, path, status, latency, and the model / task / client name the route
recorded on ``request.state``. Paths are the raw request path (ids and task names, which are not
private); query strings are dropped. Successful progress polls (``GET`` of the warm-up and job
status routes, which ``dpicl tasks warm`` and the console repeat every second or two) are logged
at debug level, so they do not bury the requests that change something.

Access lines skip the logging machinery (a record, a queue hop and a flushed write per request cost
more CPU than the rest of a cached-task request's bookkeeping): the event loop appends the line's
fields to a queue and a writer thread writes them in batches, at most :data:`ACCESS_FLUSH_SECONDS`
late. When something else listens on the ``dpicl`` loggers (tests capture them) the lines go through
logging as before, so they are seen at once.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import logging.handlers
import os
import queue
import re
import sys
import threading
import time
from typing import Any, TextIO

try:  # orjson is a dependency; json is the fallback
    import orjson

    def _line(obj: dict[str, Any]) -> bytes:
        return orjson.dumps(obj, default=str) + b"\n"
except ImportError:  # pragma: no cover - depends on the environment
    def _line(obj: dict[str, Any]) -> bytes:
        return (json.dumps(obj, separators=(",", ":"), ensure_ascii=False, default=str) + "\n").encode()

ACCESS_LOGGER = "dpicl.access"


class JsonFormatter(logging.Formatter):
    """Formats records as one JSON object per line (extra fields under ``record.fields``)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        else:
            out["msg"] = record.getMessage()
        # Tracebacks are deliberately not printed: exception text can quote data.
        if record.exc_info and record.exc_info[0] is not None:
            out["exc_type"] = record.exc_info[0].__name__
        return json.dumps(out, separators=(",", ":"), ensure_ascii=False, default=str)


class _FieldsQueueHandler(logging.handlers.QueueHandler):
    """Queues records for the writer thread without formatting them on the event loop."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # Render the message now (args may be mutable) but leave JSON formatting to the writer.
        record = logging.makeLogRecord(record.__dict__)
        record.msg = record.getMessage()
        record.args = None
        record.exc_info = (record.exc_info[0], None, None) if record.exc_info else None  # type: ignore[assignment]
        record.exc_text = None
        return record


#: Longest delay of a batched access line.
ACCESS_FLUSH_SECONDS = 0.1


class _AccessWriter:
    """Writes access lines in batches from a daemon thread (deque appends are thread-safe)."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dpicl-access-log", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def add(self, fields: dict[str, Any]) -> None:
        self._pending.append(fields)

    def flush(self) -> None:
        """Write every pending line now (one write call)."""
        lines = []
        pending = self._pending
        while pending:
            lines.append(_line(pending.popleft()))
        if not lines:
            return
        data = b"".join(lines)
        try:
            buffer = getattr(self._stream, "buffer", None)
            if buffer is not None:
                self._stream.flush()  # keep order with text already written to the stream
                buffer.write(data)
                buffer.flush()
            else:
                self._stream.write(data.decode("utf-8", "replace"))
                self._stream.flush()
        except (OSError, ValueError):  # closed or broken stderr: drop the lines, never crash
            pass

    def _run(self) -> None:
        while not self._stop.wait(ACCESS_FLUSH_SECONDS):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self.flush()


_access_writer: _AccessWriter | None = None


def flush_access_log() -> None:
    """Write pending access lines now (tests, shutdown)."""
    if _access_writer is not None:
        _access_writer.flush()


def setup_logging(level: str = "INFO") -> None:
    """Send the ``dpicl`` loggers to stderr as JSON lines (idempotent).

    Records go through a queue to a writer thread: a blocking write to stderr (a slow pipe, a
    busy terminal) then never stalls the event loop that serves requests.
    """
    root = logging.getLogger("dpicl")
    root.setLevel(level)
    if not any(getattr(h, "_dpicl", False) for h in root.handlers):
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(JsonFormatter())
        q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        handler = _FieldsQueueHandler(q)
        handler._dpicl = True  # type: ignore[attr-defined]
        listener = logging.handlers.QueueListener(q, stream, respect_handler_level=False)
        listener.start()
        atexit.register(listener.stop)
        root.addHandler(handler)
        global _access_writer
        if _access_writer is None:
            _access_writer = _AccessWriter(sys.stderr)
    root.propagate = False


def _batched() -> _AccessWriter | None:
    """The access writer, when only our own handler listens on the ``dpicl`` loggers."""
    if _access_writer is None:
        return None
    root = logging.getLogger("dpicl")
    access = logging.getLogger(ACCESS_LOGGER)
    if access.handlers or len(root.handlers) != 1 or not getattr(root.handlers[0], "_dpicl", False):
        return None
    return _access_writer


#: Status routes that progress displays poll: ``/admin/warmups[/{id}]``, ``/admin/jobs[/{id}]``.
_POLL_PATH = re.compile(r"^/admin/(warmups|jobs)(/[^/]+)?/?$")


def is_poll(method: str, path: str, status: int) -> bool:
    """Whether a request is a successful progress poll (its access line is logged at debug level)."""
    return method == "GET" and status < 400 and _POLL_PATH.match(path) is not None


def log_request(method: str, path: str, status: int, started: float, state: dict[str, Any]) -> None:
    """Emit the access line of one request (at debug level for a progress poll)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    level = logging.DEBUG if is_poll(method, path, status) else logging.INFO
    if not logger.isEnabledFor(level):
        return
    fields: dict[str, Any] = {
        "event": "request",
        "method": method,
        "path": path[:256],
        "status": status,
        "latency_ms": round((time.perf_counter() - started) * 1000, 3),
    }
    for key in ("model", "task", "client", "cache"):
        value = state.get(key)
        if value is not None:
            fields[key] = value
    writer = _batched()
    if writer is not None:
        name = "debug" if level == logging.DEBUG else "info"
        writer.add({"ts": round(time.time(), 3), "level": name, "logger": ACCESS_LOGGER, **fields})
        return
    logger.log(level, "request", extra={"fields": fields})


def log_event(name: str, **fields: Any) -> None:
    """An operational event (warm-up, spend, dataset upload) with non-private fields only."""
    logging.getLogger("dpicl.events").info(name, extra={"fields": {"event": name, **fields}})


#: Environment switches that silence the progress bars of tqdm, huggingface_hub and transformers.
_QUIET_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
              "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def server_logging() -> dict[str, Any]:
    """Make a serving process write JSON lines only; returns uvicorn's ``log_config``.

    Progress bars (model loading) are switched off: progress of long work is reported by the
    warm-up and job status instead. Python warnings and records of other libraries' loggers
    (warning level and up) become JSON lines too, so the log stays one JSON object per line.
    """
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    setup_logging()
    logging.captureWarnings(True)
    root = logging.getLogger()
    if not any(getattr(h, "_dpicl", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler.setLevel(logging.WARNING)
        handler._dpicl = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    formatter = {"()": "proxy.logs.JsonFormatter"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "loggers": {name: {"handlers": ["stderr"], "level": "INFO", "propagate": False}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }
