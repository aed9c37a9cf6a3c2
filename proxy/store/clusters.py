"""Per-label cluster releases of dataset versions, for both backends (store mixins).

A release (``{"centroids": [[...]], "noisy_sizes": [...], ...}``) is the output of the clustering
of one label's units (:mod:`proxy.serving.clusters`): DP centroids (or public ones) and DP cluster
sizes, charged once on the label's partition. It never holds members, rows or text: which cluster
a unit belongs to is recomputed from the rows by the nearest-centroid rule each time it is needed.
The first stored release for a (dataset version, key) wins, like the row-length releases
(:mod:`proxy.store.widths`). Deleting the dataset deletes its releases.
"""

from __future__ import annotations

from typing import Any

from proxy.store.keyed_releases import redis_get, redis_set, sqlite_get, sqlite_schema, sqlite_set

#: The SQLite table (part of the SQLite store's schema).
SQLITE_SCHEMA = sqlite_schema("cluster_releases")


class SqliteClusterReleases:
    """``get/set_cluster_release`` on the SQLite store's connection and transactions."""

    def get_cluster_release(self, dataset_id: str, key: str) -> dict[str, Any] | None:
        """The stored release of ``key`` on dataset version ``dataset_id`` (None if none yet)."""
        return sqlite_get(self, "cluster_releases", dataset_id, key)

    def set_cluster_release(self, dataset_id: str, key: str, release: dict[str, Any]) -> dict[str, Any]:
        """Store ``release`` unless one is stored for ``key`` (first wins); returns the stored one."""
        return sqlite_set(self, "cluster_releases", dataset_id, key, release)


class RedisClusterReleases:
    """The same on Redis: one hash ``{prefix}clusters:{dataset id}`` of key -> release JSON."""

    def get_cluster_release(self, dataset_id: str, key: str) -> dict[str, Any] | None:
        """The stored release of ``key`` on dataset version ``dataset_id`` (None if none yet)."""
        return redis_get(self, "clusters", dataset_id, key)

    def set_cluster_release(self, dataset_id: str, key: str, release: dict[str, Any]) -> dict[str, Any]:
        """Store ``release`` unless one is stored for ``key`` (first wins); returns the stored one."""
        return redis_set(self, "clusters", dataset_id, key, release)
