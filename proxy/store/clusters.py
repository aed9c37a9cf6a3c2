"""Per-label cluster releases of dataset versions, for both backends (store mixins).

A release (``{"centroids": [[...]], "noisy_sizes": [...], ...}``) is the output of the clustering
of one label's units (:mod:`proxy.serving.clusters`): DP centroids (or public ones) and DP cluster
sizes, charged once on the label's partition. It never holds members, rows or text: which cluster
a unit belongs to is recomputed from the rows by the nearest-centroid rule each time it is needed.
The first stored release for a (dataset version, key) wins, like the row-length releases
(:mod:`proxy.store.widths`). Deleting the dataset deletes its releases.
"""

from __future__ import annotations

import json
from typing import Any

from proxy.store.base import NotFound

#: The SQLite table (part of the SQLite store's schema).
SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS cluster_releases (
    dataset_id TEXT NOT NULL,
    key TEXT NOT NULL,
    release TEXT NOT NULL,
    PRIMARY KEY (dataset_id, key)
);
"""

_SELECT = "SELECT release FROM cluster_releases WHERE dataset_id = ? AND key = ?"


class SqliteClusterReleases:
    """``get/set_cluster_release`` on the SQLite store's connection and transactions."""

    def get_cluster_release(self, dataset_id: str, key: str) -> dict[str, Any] | None:
        """The stored release of ``key`` on dataset version ``dataset_id`` (None if none yet)."""
        row = self._conn().execute(_SELECT, (dataset_id, key)).fetchone()  # type: ignore[attr-defined]
        return json.loads(row[0]) if row is not None else None

    def set_cluster_release(self, dataset_id: str, key: str, release: dict[str, Any]) -> dict[str, Any]:
        """Store ``release`` unless one is stored for ``key`` (first wins); returns the stored one."""
        with self._tx() as c:  # type: ignore[attr-defined]
            if c.execute("SELECT 1 FROM datasets WHERE id = ?", (dataset_id,)).fetchone() is None:
                raise NotFound(f"dataset {dataset_id} not found")
            c.execute("INSERT OR IGNORE INTO cluster_releases (dataset_id, key, release) VALUES (?, ?, ?)",
                      (dataset_id, key, json.dumps(release)))
            row = c.execute(_SELECT, (dataset_id, key)).fetchone()
        return dict(json.loads(row[0]))  # an earlier release may have won (both were charged)


class RedisClusterReleases:
    """The same on Redis: one hash ``{prefix}clusters:{dataset id}`` of key -> release JSON."""

    def get_cluster_release(self, dataset_id: str, key: str) -> dict[str, Any] | None:
        """The stored release of ``key`` on dataset version ``dataset_id`` (None if none yet)."""
        raw = self.r.hget(self._k("clusters", dataset_id), key)  # type: ignore[attr-defined]
        return json.loads(raw) if raw is not None else None

    def set_cluster_release(self, dataset_id: str, key: str, release: dict[str, Any]) -> dict[str, Any]:
        """Store ``release`` unless one is stored for ``key`` (first wins); returns the stored one."""
        meta_key, releases = self._k("ds", dataset_id), self._k("clusters", dataset_id)  # type: ignore[attr-defined]

        def txn(pipe: Any) -> dict[str, Any]:
            if not pipe.exists(meta_key):
                raise NotFound(f"dataset {dataset_id} not found")
            raw = pipe.hget(releases, key)
            pipe.multi()
            if raw is not None:
                return dict(json.loads(raw))  # an earlier release won (both were charged)
            pipe.hset(releases, key, json.dumps(release))
            return dict(release)

        return self._transaction(txn, meta_key, releases)  # type: ignore[attr-defined]
