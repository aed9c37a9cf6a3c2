"""DP row-length releases of dataset versions, per tokenizer, for both backends (store mixins).

A release (:class:`aggregation.quantile.WidthRelease` as JSON) is DP output, charged once by
:meth:`proxy.budget.BudgetService.width_release`; the first stored release for a (dataset version,
tokenizer) wins, like the other DP releases (:mod:`proxy.store.releases`). Deleting the dataset
deletes its releases.
"""

from __future__ import annotations

from typing import Any

from proxy.store.keyed_releases import redis_get, redis_set, sqlite_get, sqlite_schema, sqlite_set

#: The SQLite table (part of the SQLite store's schema).
SQLITE_SCHEMA = sqlite_schema("width_releases")


class SqliteWidthReleases:
    """``get/set_width_release`` on the SQLite store's connection and transactions."""

    def get_width_release(self, dataset_id: str, key: str) -> dict[str, Any] | None:
        """The stored release of ``key`` on dataset version ``dataset_id`` (None if none yet)."""
        return sqlite_get(self, "width_releases", dataset_id, key)

    def set_width_release(self, dataset_id: str, key: str, release: dict[str, Any]) -> dict[str, Any]:
        """Store ``release`` unless one is stored for ``key`` (first wins); returns the stored one."""
        return sqlite_set(self, "width_releases", dataset_id, key, release)


class RedisWidthReleases:
    """The same on Redis: one hash ``{prefix}widths:{dataset id}`` of key -> release JSON."""

    def get_width_release(self, dataset_id: str, key: str) -> dict[str, Any] | None:
        """The stored release of ``key`` on dataset version ``dataset_id`` (None if none yet)."""
        return redis_get(self, "widths", dataset_id, key)

    def set_width_release(self, dataset_id: str, key: str, release: dict[str, Any]) -> dict[str, Any]:
        """Store ``release`` unless one is stored for ``key`` (first wins); returns the stored one."""
        return redis_set(self, "widths", dataset_id, key, release)
