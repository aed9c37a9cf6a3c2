"""DP row-length releases of dataset versions, per tokenizer, for both backends (store mixins).

A release (:class:`aggregation.quantile.WidthRelease` as JSON) is DP output, charged once by
:meth:`proxy.budget.BudgetService.width_release`; the first stored release for a (dataset version,
tokenizer) wins, like the other DP releases (:mod:`proxy.store.releases`). Deleting the dataset
deletes its releases.
"""

from __future__ import annotations

import json
from typing import Any

from proxy.store.base import NotFound

#: The SQLite table (part of the SQLite store's schema).
SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS width_releases (
    dataset_id TEXT NOT NULL,
    key TEXT NOT NULL,
    release TEXT NOT NULL,
    PRIMARY KEY (dataset_id, key)
);
"""

_SELECT = "SELECT release FROM width_releases WHERE dataset_id = ? AND key = ?"


class SqliteWidthReleases:
    """``get/set_width_release`` on the SQLite store's connection and transactions."""

    def get_width_release(self, dataset_id: str, key: str) -> dict[str, Any] | None:
        row = self._conn().execute(_SELECT, (dataset_id, key)).fetchone()  # type: ignore[attr-defined]
        return json.loads(row[0]) if row is not None else None

    def set_width_release(self, dataset_id: str, key: str, release: dict[str, Any]) -> dict[str, Any]:
        with self._tx() as c:  # type: ignore[attr-defined]
            if c.execute("SELECT 1 FROM datasets WHERE id = ?", (dataset_id,)).fetchone() is None:
                raise NotFound(f"dataset {dataset_id} not found")
            c.execute("INSERT OR IGNORE INTO width_releases (dataset_id, key, release) VALUES (?, ?, ?)",
                      (dataset_id, key, json.dumps(release)))
            row = c.execute(_SELECT, (dataset_id, key)).fetchone()
        return dict(json.loads(row[0]))  # an earlier release may have won (both were charged)


class RedisWidthReleases:
    """The same on Redis: one hash ``{prefix}widths:{dataset id}`` of tokenizer -> release JSON."""

    def get_width_release(self, dataset_id: str, key: str) -> dict[str, Any] | None:
        raw = self.r.hget(self._k("widths", dataset_id), key)  # type: ignore[attr-defined]
        return json.loads(raw) if raw is not None else None

    def set_width_release(self, dataset_id: str, key: str, release: dict[str, Any]) -> dict[str, Any]:
        meta_key, widths = self._k("ds", dataset_id), self._k("widths", dataset_id)  # type: ignore[attr-defined]

        def txn(pipe: Any) -> dict[str, Any]:
            if not pipe.exists(meta_key):
                raise NotFound(f"dataset {dataset_id} not found")
            raw = pipe.hget(widths, key)
            pipe.multi()
            if raw is not None:
                return dict(json.loads(raw))  # an earlier release won (both were charged)
            pipe.hset(widths, key, json.dumps(release))
            return dict(release)

        return self._transaction(txn, meta_key, widths)  # type: ignore[attr-defined]
