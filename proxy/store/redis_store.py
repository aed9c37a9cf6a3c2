"""Redis backend: one Redis shared by many proxy replicas and job workers.

Every key starts with a prefix (``dpicl:`` by default) so one Redis can hold several deployments:

============================  ===============================================================
``{p}ds:{id}``                dataset metadata (JSON string)
``{p}ds:ids``                 set of dataset ids
``{p}ds:versions``            hash: dataset name -> last version handed out
``{p}rows:{id}``              list of rows, each ``[text, label]`` JSON (private; own key)
``{p}ledger:{id}``            list of ledger entries (JSON); entry ``seq`` = list index + 1
``{p}demo:{key}``             cached demonstration set ``{dataset_id, task, payload}``
``{p}demos:ds:{id}``          set of demo keys of a dataset; ``{p}demos:task:{task}`` by task
``{p}tasks``                  hash: task name -> spec JSON
``{p}client_keys``            hash: client key name -> record JSON (the key's SHA-256, not the key)
``{p}job:{id}``, ``{p}jobs``  job record JSON; sorted set of job ids by creation time
``{p}blob:{key}``             raw bytes of a job result
============================  ===============================================================

Atomicity: multi-key writes are ``MULTI``/``EXEC`` transactions (all or nothing). Read-modify-
write operations (``append_ledger``, ``update_job``, ``update_dataset``, ``delete_dataset``) are
optimistic: ``WATCH`` the keys, read, decide, then ``MULTI``/``EXEC``; if any watched key changed
in between, Redis discards the transaction and we start again from a fresh read (for the ledger
that means the budget check runs again on the new ledger).
"""

from __future__ import annotations

import json
import random
import time
from typing import Any, Callable, Sequence, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis

from proxy.store.base import (
    BudgetCheck,
    Charge,
    DatasetMeta,
    LedgerEntry,
    NotFound,
    Store,
    StoreError,
)
from proxy.store.sqlite import _demo_filter, new_dataset_id

T = TypeVar("T")

#: Rows are pushed in chunks so one command never carries an enormous argument list.
_ROW_CHUNK = 5000
#: Optimistic transactions give up after this many conflicts (each conflict means another
#: client made progress, so this only trips under pathological contention).
_MAX_ATTEMPTS = 10_000


def split_prefix(url: str, default: str = "dpicl:") -> tuple[str, str]:
    """Remove a ``prefix=`` query parameter (ours, not redis-py's) from ``url``."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = default
    kept = []
    for k, v in query:
        if k == "prefix":
            prefix = v
        else:
            kept.append((k, v))
    return urlunsplit(parts._replace(query=urlencode(kept))), prefix


class RedisStore(Store):
    """:class:`~proxy.store.base.Store` on Redis (``redis://host:port/db``; ``?prefix=`` optional)."""

    def __init__(self, url: str, prefix: str | None = None, socket_timeout: float = 30.0):
        url, url_prefix = split_prefix(url)
        self.prefix = url_prefix if prefix is None else prefix
        # The connection pool is thread-safe and re-creates connections after fork().
        self.r = redis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=5.0)

    # -- keys ---------------------------------------------------------------------------
    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _transaction(self, fn: Callable[[redis.client.Pipeline], T], *watch: str) -> T:
        """Run ``fn(pipe)`` under WATCH on ``watch`` until EXEC succeeds; returns fn's value.

        ``fn`` reads in immediate mode, calls ``pipe.multi()`` and queues its writes; it is
        called again from scratch after every conflict.
        """
        for attempt in range(_MAX_ATTEMPTS):
            with self.r.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(*watch)
                    result = fn(pipe)
                    pipe.execute()
                    return result
                except redis.WatchError:
                    # Another client wrote a watched key: back off a little (jittered, growing
                    # to a few ms) so contending writers do not keep invalidating each other.
                    time.sleep(random.random() * min(0.005, 0.0002 * (attempt + 1)))
        raise StoreError("gave up after too many conflicting concurrent updates")

    @staticmethod
    def _meta_from(raw: bytes) -> DatasetMeta:
        d = json.loads(raw)
        return DatasetMeta(**d)

    @staticmethod
    def _meta_json(meta: DatasetMeta) -> str:
        return json.dumps({
            "id": meta.id, "name": meta.name, "version": int(meta.version), "rows": int(meta.rows),
            "labels": list(meta.labels), "budget_epsilon": float(meta.budget_epsilon),
            "budget_delta": float(meta.budget_delta), "created_at": float(meta.created_at),
            "public": bool(meta.public), "noisy_counts": meta.noisy_counts,
        })

    # -- datasets -----------------------------------------------------------------------
    def create_dataset(self, name: str, rows: Sequence[tuple[str, str]], budget_epsilon: float,
                       budget_delta: float, public: bool = False) -> DatasetMeta:
        rows = [(str(t), str(lab)) for t, lab in rows]
        # HINCRBY is atomic; a failed upload only leaves a gap in the version numbers.
        version = int(self.r.hincrby(self._k("ds", "versions"), name, 1))
        meta = DatasetMeta(new_dataset_id(), name, version, len(rows), sorted({lab for _, lab in rows}),
                           float(budget_epsilon), float(budget_delta), time.time(), bool(public), None)
        with self.r.pipeline(transaction=True) as pipe:
            rows_key = self._k("rows", meta.id)
            for i in range(0, len(rows), _ROW_CHUNK):
                pipe.rpush(rows_key, *(json.dumps(r) for r in rows[i:i + _ROW_CHUNK]))
            pipe.set(self._k("ds", meta.id), self._meta_json(meta))
            pipe.sadd(self._k("ds", "ids"), meta.id)
            pipe.execute()
        return meta

    def get_dataset(self, dataset_id: str) -> DatasetMeta:
        raw = self.r.get(self._k("ds", dataset_id))
        if raw is None:
            raise NotFound(f"dataset {dataset_id} not found")
        return self._meta_from(raw)

    def list_datasets(self) -> list[DatasetMeta]:
        ids = sorted(i.decode() for i in self.r.smembers(self._k("ds", "ids")))
        if not ids:
            return []
        raws = self.r.mget([self._k("ds", i) for i in ids])
        metas = [self._meta_from(raw) for raw in raws if raw is not None]
        return sorted(metas, key=lambda m: (m.created_at, m.id))

    def load_rows(self, dataset_id: str) -> list[tuple[str, str]]:
        with self.r.pipeline(transaction=True) as pipe:  # one snapshot of metadata and rows
            pipe.exists(self._k("ds", dataset_id))
            pipe.lrange(self._k("rows", dataset_id), 0, -1)
            exists, raw = pipe.execute()
        if not exists:
            raise NotFound(f"dataset {dataset_id} not found")
        return [tuple(json.loads(x)) for x in raw]  # type: ignore[misc]

    def delete_dataset(self, dataset_id: str) -> None:
        meta_key, by_ds = self._k("ds", dataset_id), self._k("demos", "ds", dataset_id)

        def txn(pipe: redis.client.Pipeline) -> None:
            if not pipe.exists(meta_key):
                raise NotFound(f"dataset {dataset_id} not found")
            demo_keys = [self._k("demo", k.decode()) for k in pipe.smembers(by_ds)]
            pipe.multi()
            # The ledger key is deliberately kept: spend on deleted data is still spend.
            pipe.delete(meta_key, self._k("rows", dataset_id), by_ds, *demo_keys)
            pipe.srem(self._k("ds", "ids"), dataset_id)

        self._transaction(txn, meta_key, by_ds)

    def update_dataset(self, meta: DatasetMeta) -> None:
        meta_key = self._k("ds", meta.id)

        def txn(pipe: redis.client.Pipeline) -> None:
            if not pipe.exists(meta_key):
                raise NotFound(f"dataset {meta.id} not found")
            pipe.multi()
            pipe.set(meta_key, self._meta_json(meta))

        self._transaction(txn, meta_key)

    # -- ledger -------------------------------------------------------------------------
    @staticmethod
    def _entry(raw: bytes) -> LedgerEntry:
        return LedgerEntry(**json.loads(raw))

    def ledger(self, dataset_id: str, after_seq: int = 0) -> list[LedgerEntry]:
        # seq = index + 1, so entries after ``after_seq`` start at index ``after_seq``.
        return [self._entry(x) for x in self.r.lrange(self._k("ledger", dataset_id), max(0, int(after_seq)), -1)]

    def append_ledger(self, dataset_id: str, charges: Sequence[Charge], actor: str, reason: str,
                      check: BudgetCheck) -> list[LedgerEntry]:
        meta_key, ledger_key = self._k("ds", dataset_id), self._k("ledger", dataset_id)

        def txn(pipe: redis.client.Pipeline) -> list[LedgerEntry]:
            raw_meta = pipe.get(meta_key)
            if raw_meta is None:
                raise NotFound(f"dataset {dataset_id} not found")
            current = [self._entry(x) for x in pipe.lrange(ledger_key, 0, -1)]
            epsilon_after = float(check(self._meta_from(raw_meta), current))
            now = time.time()
            new = [LedgerEntry(len(current) + i + 1, dataset_id, ch.partition, dict(ch.event), epsilon_after,
                               actor, reason, now) for i, ch in enumerate(charges)]
            pipe.multi()
            if new:
                pipe.rpush(ledger_key, *(json.dumps(e.__dict__) for e in new))
            return new

        # Watching the metadata too: a concurrent budget change or deletion forces a re-check.
        return self._transaction(txn, meta_key, ledger_key)

    # -- demonstration cache ------------------------------------------------------------
    def get_demos(self, key: str) -> dict[str, Any] | None:
        raw = self.r.get(self._k("demo", key))
        return json.loads(raw)["payload"] if raw is not None else None

    def put_demos(self, key: str, dataset_id: str, task: str, payload: dict[str, Any]) -> None:
        demo_key = self._k("demo", key)
        doc = json.dumps({"dataset_id": dataset_id, "task": task, "payload": payload})

        def txn(pipe: redis.client.Pipeline) -> None:
            old = pipe.get(demo_key)
            pipe.multi()
            if old is not None:  # re-put under another dataset/task: keep the indexes exact
                prev = json.loads(old)
                pipe.srem(self._k("demos", "ds", prev["dataset_id"]), key)
                pipe.srem(self._k("demos", "task", prev["task"]), key)
            pipe.set(demo_key, doc)
            pipe.sadd(self._k("demos", "ds", dataset_id), key)
            pipe.sadd(self._k("demos", "task", task), key)

        self._transaction(txn, demo_key)

    def delete_demos(self, key: str | None = None, dataset_id: str | None = None, task: str | None = None) -> int:
        _demo_filter(key, dataset_id, task)  # same validation as SQLite (needs some filter)
        if key is not None:
            candidates = [key]
        elif dataset_id is not None:
            candidates = [k.decode() for k in self.r.smembers(self._k("demos", "ds", dataset_id))]
        else:
            candidates = [k.decode() for k in self.r.smembers(self._k("demos", "task", str(task)))]
        dropped = 0
        for k in candidates:
            demo_key = self._k("demo", k)

            def txn(pipe: redis.client.Pipeline, k: str = k, demo_key: str = demo_key) -> int:
                raw = pipe.get(demo_key)
                if raw is None:
                    return 0
                doc = json.loads(raw)
                if (dataset_id is not None and doc["dataset_id"] != dataset_id) or \
                        (task is not None and doc["task"] != task):
                    pipe.multi()
                    return 0
                pipe.multi()
                pipe.delete(demo_key)
                pipe.srem(self._k("demos", "ds", doc["dataset_id"]), k)
                pipe.srem(self._k("demos", "task", doc["task"]), k)
                return 1

            dropped += self._transaction(txn, demo_key)
        return dropped

    # -- tasks --------------------------------------------------------------------------
    def put_task(self, name: str, spec: dict[str, Any]) -> None:
        self.r.hset(self._k("tasks"), name, json.dumps(spec))

    def get_task(self, name: str) -> dict[str, Any] | None:
        raw = self.r.hget(self._k("tasks"), name)
        return json.loads(raw) if raw is not None else None

    def list_tasks(self) -> dict[str, dict[str, Any]]:
        raw = self.r.hgetall(self._k("tasks"))
        return {k.decode(): json.loads(v) for k, v in sorted(raw.items())}

    def delete_task(self, name: str) -> bool:
        return bool(self.r.hdel(self._k("tasks"), name))

    # -- client keys --------------------------------------------------------------------
    def add_client_key(self, name: str, record: dict[str, Any]) -> bool:
        return bool(self.r.hsetnx(self._k("client_keys"), name, json.dumps(record)))

    def list_client_keys(self) -> dict[str, dict[str, Any]]:
        raw = self.r.hgetall(self._k("client_keys"))
        return {k.decode(): json.loads(v) for k, v in sorted(raw.items())}

    def delete_client_key(self, name: str) -> bool:
        return bool(self.r.hdel(self._k("client_keys"), name))

    # -- jobs ---------------------------------------------------------------------------
    def put_job(self, job_id: str, record: dict[str, Any]) -> None:
        with self.r.pipeline(transaction=True) as pipe:
            pipe.set(self._k("job", job_id), json.dumps(record))
            pipe.zadd(self._k("jobs"), {job_id: time.time()}, nx=True)  # keep first creation time
            pipe.execute()

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        raw = self.r.get(self._k("job", job_id))
        return json.loads(raw) if raw is not None else None

    def list_jobs(self) -> list[dict[str, Any]]:
        ids = [i.decode() for i in self.r.zrange(self._k("jobs"), 0, -1)]
        if not ids:
            return []
        return [json.loads(raw) for raw in self.r.mget([self._k("job", i) for i in ids]) if raw is not None]

    def update_job(self, job_id: str, **fields: Any) -> dict[str, Any]:
        job_key = self._k("job", job_id)

        def txn(pipe: redis.client.Pipeline) -> dict[str, Any]:
            raw = pipe.get(job_key)
            if raw is None:
                raise NotFound(f"job {job_id} not found")
            record = {**json.loads(raw), **fields}
            pipe.multi()
            pipe.set(job_key, json.dumps(record))
            return record

        return self._transaction(txn, job_key)

    # -- blobs --------------------------------------------------------------------------
    def put_blob(self, key: str, data: bytes) -> None:
        self.r.set(self._k("blob", key), bytes(data))

    def get_blob(self, key: str) -> bytes | None:
        raw = self.r.get(self._k("blob", key))
        return bytes(raw) if raw is not None else None

    # -- operations ---------------------------------------------------------------------
    def ping(self) -> bool:
        try:
            return bool(self.r.ping())
        except (redis.RedisError, OSError):
            return False

    def close(self) -> None:
        self.r.close()
        self.r.connection_pool.disconnect()
