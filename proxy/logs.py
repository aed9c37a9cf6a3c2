"""Structured JSON logs: one line per request, never bodies, never dataset text.

A request line holds method, path, status, latency, and the model / task / client name the route
recorded on ``request.state``. Paths are the raw request path (ids and task names, which are not
private); query strings are dropped.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import os
import queue
import sys
import time
from typing import Any

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
    root.propagate = False


def log_request(method: str, path: str, status: int, started: float, state: dict[str, Any]) -> None:
    """Emit the access line of one request."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not logger.isEnabledFor(logging.INFO):
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
    logger.info("request", extra={"fields": fields})


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
