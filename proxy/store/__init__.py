"""One Store interface (base) with SQLite (sqlite) and Redis (redis_store) backends, and open_store,
which picks one from a URL (sqlite:///file.db or redis://host:port/db; docs/stores.md). Stores hold
data, not policy: they import nothing from the rest of the project.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from proxy.store.base import (
    AuditEntry,
    BudgetCheck,
    BudgetExceeded,
    Charge,
    DatasetMeta,
    LedgerEntry,
    NotFound,
    Population,
    SchemaError,
    Store,
    StoreBusy,
    StoreError,
)

__all__ = [
    "AuditEntry", "BudgetCheck", "BudgetExceeded", "Charge", "DatasetMeta", "LedgerEntry", "NotFound",
    "Population", "SchemaError", "Store", "StoreBusy", "StoreError", "busy_reason", "default_store_url",
    "open_store",
]


def default_store_url() -> str:
    """``sqlite:///<DPICL_DATA_DIR or ~/.local/share/dpicl>/dpicl.db``."""
    base = os.environ.get("DPICL_DATA_DIR") or str(Path.home() / ".local" / "share" / "dpicl")
    return f"sqlite:///{Path(base).expanduser() / 'dpicl.db'}"


def open_store(url: str | None = None) -> Store:
    """Open the store named by ``url``.

    ``None`` or ``""`` means ``$DPICL_STORE_URL`` if set, else :func:`default_store_url`. Redis
    keys are prefixed with ``dpicl:`` unless the URL has ``?prefix=...`` or
    ``$DPICL_REDIS_PREFIX`` is set (the URL wins). Raises ValueError for an
    unknown scheme; the message never echoes the URL (it may contain a password).
    """
    url = url or os.environ.get("DPICL_STORE_URL") or default_store_url()
    if url.startswith("sqlite:///"):
        # SQLAlchemy's convention: sqlite:///relative/path.db, sqlite:////absolute/path.db.
        from proxy.store.sqlite import SqliteStore

        path = url[len("sqlite:///"):]
        if not path or path == ":memory:":
            raise ValueError("a sqlite store URL needs a file path, e.g. sqlite:///data/dpicl.db")
        return SqliteStore(path)
    if url.split("://", 1)[0] in ("redis", "rediss", "unix"):
        from proxy.store.redis_store import RedisStore, split_prefix

        env_prefix = os.environ.get("DPICL_REDIS_PREFIX") or None
        url, prefix = split_prefix(url, default=env_prefix or "dpicl:")
        return RedisStore(url, prefix=prefix)
    raise ValueError("unknown store URL scheme; use sqlite:///path/to/file.db or redis://host:port/db")


def busy_reason(exc: BaseException) -> str | None:
    """One line saying why the store did not answer in time, or None if ``exc`` is not that.

    Covers :class:`StoreBusy` and the backends' own timeout errors that escape a store call (a
    SQLite lock wait, a Redis socket timeout or lost connection), so the API can answer 503 with
    ``Retry-After`` instead of 500. Never quotes the exception's text beyond our own messages.
    """
    if isinstance(exc, StoreBusy):
        return str(exc)
    import sqlite3

    if isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc)):
        return "the SQLite store is locked by another writer"
    redis = sys.modules.get("redis")  # only when the Redis backend is in use
    if redis is not None and isinstance(exc, (redis.exceptions.TimeoutError, redis.exceptions.ConnectionError)):
        return "the Redis store did not answer in time"
    return None
