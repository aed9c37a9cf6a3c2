"""The keyed DP releases of a dataset version, for both backends (store mixins).

Two kinds, each stored as key -> release JSON per dataset version (a SQLite table, or one Redis
hash ``{prefix}{kind}:{dataset id}``):

* ``width``: the DP row-length release per tokenizer (:class:`aggregation.quantile.WidthRelease`
  as JSON), charged once by :meth:`proxy.budget.BudgetService.width_release`;
* ``cluster``: the clustering of one label's units (:mod:`proxy.serving.clusters`), i.e.
  ``{"centroids": [[...]], "noisy_sizes": [...], ...}``: DP centroids (or public ones) and DP
  cluster sizes, charged once on the label's partition. It never holds members, rows or text: which
  cluster a unit belongs to is recomputed from the rows by the nearest-centroid rule.

The first release stored for a (dataset version, key) wins: two processes racing on a first
release were both charged, and both callers then use the one stored. A release of a dataset
version that no longer exists is refused (``NotFound``), so deleting a dataset deletes its releases.

The public methods (``get_width_release``, ``set_cluster_release``, ...; declared by
:class:`proxy.store.releases.DpReleases`) are built per kind by :func:`sqlite_methods` and
:func:`redis_methods` and named in the two mixins' class bodies, so they stay greppable and
visible to ``help()``; a class factory would hide the names from readers and type checkers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from proxy.store.base import NotFound

#: ``get(store, dataset_id, key)``: the stored release, or None if none yet.
Getter = Callable[[Any, str, str], dict[str, Any] | None]
#: ``set(store, dataset_id, key, release)``: store unless stored (first wins); returns the stored one.
Setter = Callable[[Any, str, str, dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Kind:
    """One kind of keyed release: its method noun, SQLite table and Redis hash name."""

    noun: str  # ``get_{noun}_release`` / ``set_{noun}_release``
    table: str
    hash: str


WIDTHS = Kind("width", "width_releases", "widths")
CLUSTERS = Kind("cluster", "cluster_releases", "clusters")
#: Every kind (deleting a dataset version deletes the releases of each).
KINDS = (WIDTHS, CLUSTERS)


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


#: The tables of every kind (part of the SQLite store's schema).
SQLITE_SCHEMA = "".join(sqlite_schema(kind.table) for kind in KINDS)


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


def _named(kind: Kind, get: Getter, put: Setter) -> tuple[Getter, Setter]:
    """Give the pair the public names and docstrings of ``kind`` (tracebacks and ``help()``)."""
    for fn, verb in ((get, "get"), (put, "set")):
        fn.__name__ = fn.__qualname__ = f"{verb}_{kind.noun}_release"
    get.__doc__ = (f"The stored {kind.noun} release of ``key`` on dataset version ``dataset_id`` "
                   "(None if none yet).")
    put.__doc__ = (f"Store the {kind.noun} release ``release`` unless one is stored for ``key`` (first wins); "
                   "returns the stored one. Raises NotFound when the dataset version does not exist.")
    return get, put


def sqlite_methods(kind: Kind) -> tuple[Getter, Setter]:
    """``(get, set)`` of ``kind`` on the SQLite store's connection and transactions."""

    def get(self: Any, dataset_id: str, key: str) -> dict[str, Any] | None:
        return sqlite_get(self, kind.table, dataset_id, key)

    def put(self: Any, dataset_id: str, key: str, release: dict[str, Any]) -> dict[str, Any]:
        return sqlite_set(self, kind.table, dataset_id, key, release)

    return _named(kind, get, put)


def redis_methods(kind: Kind) -> tuple[Getter, Setter]:
    """``(get, set)`` of ``kind`` on Redis: the hash ``{prefix}{kind.hash}:{dataset id}``."""

    def get(self: Any, dataset_id: str, key: str) -> dict[str, Any] | None:
        return redis_get(self, kind.hash, dataset_id, key)

    def put(self: Any, dataset_id: str, key: str, release: dict[str, Any]) -> dict[str, Any]:
        return redis_set(self, kind.hash, dataset_id, key, release)

    return _named(kind, get, put)


class SqliteKeyedReleases:
    """``get/set_width_release`` and ``get/set_cluster_release`` of the SQLite store."""

    get_width_release, set_width_release = sqlite_methods(WIDTHS)
    get_cluster_release, set_cluster_release = sqlite_methods(CLUSTERS)


class RedisKeyedReleases:
    """The same on Redis (hashes ``{prefix}widths:{id}`` and ``{prefix}clusters:{id}``)."""

    get_width_release, set_width_release = redis_methods(WIDTHS)
    get_cluster_release, set_cluster_release = redis_methods(CLUSTERS)
