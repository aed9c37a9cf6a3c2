"""Staged uploads on the Redis store (see :mod:`proxy.store.uploads` for the design).

Each chunk is one ``MULTI``/``EXEC`` pipeline that appends to ``{p}rows:{id}`` and refreshes the
staging mark ``{p}upload:{id}`` (expiring after ``STALE_SECONDS``, so a dead uploader's mark
lapses by itself); ``{p}uploads`` lists staging ids for the sweep. Without ``{p}ds:{id}`` nothing
reads the rows. The commit runs under ``WATCH`` of the population and the mark: it writes the
metadata and drops the mark in one transaction, or refuses if the mark has lapsed.
"""

from __future__ import annotations

import json
import time
from typing import Any, Sequence

import redis

from proxy.store.base import DatasetMeta, Population, StagedUpload, StoreError
from proxy.store.uploads import STALE_SECONDS, ChunkedCreate, Row

_ABANDONED = "the upload was abandoned (its staging mark expired); upload again"


class RedisStagedUpload(StagedUpload):
    """An upload in progress on a :class:`~proxy.store.redis_store.RedisStore`."""

    def __init__(self, store: Any, name: str, budget_epsilon: float, budget_delta: float, public: bool,
                 labels: Sequence[str] | None):
        super().__init__(name, budget_epsilon, budget_delta, public, labels)
        self.store = store
        self._mark = store._k("upload", self.dataset_id)
        with store.r.pipeline(transaction=True) as pipe:
            pipe.set(self._mark, str(time.time()), ex=int(STALE_SECONDS))
            pipe.sadd(store._k("uploads"), self.dataset_id)
            pipe.execute()

    def _write(self, start: int, rows: list[Row]) -> None:
        store = self.store
        # Refresh the mark first: a lapsed mark means a sweep may have deleted earlier chunks.
        if not store.r.expire(self._mark, int(STALE_SECONDS)):
            raise StoreError(_ABANDONED)
        with store.r.pipeline(transaction=True) as pipe:
            pipe.rpush(store._k("rows", self.dataset_id), *(json.dumps(list(r)) for r in rows))
            pipe.execute()

    def _publish(self) -> DatasetMeta:
        store, name = self.store, self.name
        pop_key = store._k("pop", name)

        def txn(pipe: redis.client.Pipeline) -> DatasetMeta:
            if not pipe.exists(self._mark):
                raise StoreError(_ABANDONED)
            raw = pipe.get(pop_key)
            now = time.time()
            pop = (store._pop_from(raw, name) if raw is not None
                   else Population(name, self.budget_epsilon, self.budget_delta, 0, now))
            pop.last_version += 1
            meta = DatasetMeta(self.dataset_id, name, pop.last_version, self.rows, self.labels, pop.budget_epsilon,
                               pop.budget_delta, now, self.public, None, self.units)
            pipe.multi()
            pipe.set(pop_key, store._pop_json(pop))
            pipe.sadd(store._k("pops"), name)
            pipe.set(store._k("ds", meta.id), store._meta_json(meta))
            pipe.sadd(store._k("ds", "ids"), meta.id)
            pipe.delete(self._mark)
            pipe.srem(store._k("uploads"), meta.id)
            return meta

        return store._transaction(txn, pop_key, self._mark)

    def _discard(self) -> None:
        delete_staged(self.store, self.dataset_id)


def delete_staged(store: Any, dataset_id: str) -> None:
    """Delete a staged (never published) dataset's rows and its staging mark."""
    meta_key = store._k("ds", dataset_id)

    def txn(pipe: redis.client.Pipeline) -> None:
        if pipe.exists(meta_key):
            return  # published after all: never delete live rows
        pipe.multi()
        pipe.unlink(store._k("rows", dataset_id), store._k("upload", dataset_id))  # freed in the background
        pipe.srem(store._k("uploads"), dataset_id)

    store._transaction(txn, meta_key)


class RedisUploads(ChunkedCreate):
    """The staged-upload operations of :class:`proxy.store.base.Store` on the Redis store."""

    def begin_upload(self, name: str, budget_epsilon: float, budget_delta: float, public: bool = False,
                     labels: Sequence[str] | None = None) -> RedisStagedUpload:
        self.sweep_uploads()
        return RedisStagedUpload(self, name, budget_epsilon, budget_delta, public, labels)

    def sweep_uploads(self) -> int:
        """Delete the staged rows of uploads whose mark has lapsed; returns how many."""
        r = self.r  # type: ignore[attr-defined]
        ids = sorted(i.decode() for i in r.smembers(self._k("uploads")))  # type: ignore[attr-defined]
        dead = [i for i in ids if not r.exists(self._k("upload", i))]  # type: ignore[attr-defined]
        for dataset_id in dead:
            delete_staged(self, dataset_id)
        return len(dead)
