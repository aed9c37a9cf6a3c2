"""Storage shared by the keyed DP releases of a dataset version (row lengths, clusters).

Each kind has its own SQLite table or Redis hash per dataset version, holding key -> release JSON.
The first release stored for a (dataset version, key) wins: two processes racing on a first
release were both charged, and both callers then use the one stored. A release of a dataset
version that no longer exists is refused (``NotFound``), so deleting a dataset deletes its releases.
"""

from __future__ import annotations

import json
from typing import Any

from proxy.store.base import NotFound


def sqlite_schema(table: str) -> str:
    """The SQLite table of one kind of release (part of the SQLite store's schema)."""
    return f"""
CREATE TABLE IF NOT EXISTS {table} (
    dataset_id TEXT NOT NULL,
    key TEXT NOT NULL,
    release TEXT NOT NULL,
    PRIMARY KEY (dataset_id, key)
);
"""


def sqlite_get(store: Any, table: str, dataset_id: str, key: str) -> dict[str, Any] | None:
    """The stored release of ``key`` on ``dataset_id`` in ``table`` (None if none yet)."""
    row = store._conn().execute(f"SELECT release FROM {table} WHERE dataset_id = ? AND key = ?",
                                (dataset_id, key)).fetchone()
    return json.loads(row[0]) if row is not None else None


def sqlite_set(store: Any, table: str, dataset_id: str, key: str, release: dict[str, Any]) -> dict[str, Any]:
    """Store ``release`` unless one is stored for ``key``; returns the stored one."""
    with store._tx() as c:
        if c.execute("SELECT 1 FROM datasets WHERE id = ?", (dataset_id,)).fetchone() is None:
            raise NotFound(f"dataset {dataset_id} not found")
        c.execute(f"INSERT OR IGNORE INTO {table} (dataset_id, key, release) VALUES (?, ?, ?)",
                  (dataset_id, key, json.dumps(release)))
        row = c.execute(f"SELECT release FROM {table} WHERE dataset_id = ? AND key = ?",
                        (dataset_id, key)).fetchone()
    return dict(json.loads(row[0]))


def redis_get(store: Any, kind: str, dataset_id: str, key: str) -> dict[str, Any] | None:
    """The stored release of ``key`` in the hash ``{prefix}{kind}:{dataset id}`` (None if none yet)."""
    raw = store.r.hget(store._k(kind, dataset_id), key)
    return json.loads(raw) if raw is not None else None


def redis_set(store: Any, kind: str, dataset_id: str, key: str, release: dict[str, Any]) -> dict[str, Any]:
    """The same as :func:`sqlite_set` on Redis, in one optimistic transaction."""
    meta_key, releases = store._k("ds", dataset_id), store._k(kind, dataset_id)

    def txn(pipe: Any) -> dict[str, Any]:
        if not pipe.exists(meta_key):
            raise NotFound(f"dataset {dataset_id} not found")
        raw = pipe.hget(releases, key)
        pipe.multi()
        if raw is not None:
            return dict(json.loads(raw))
        pipe.hset(releases, key, json.dumps(release))
        return dict(release)

    return store._transaction(txn, meta_key, releases)
