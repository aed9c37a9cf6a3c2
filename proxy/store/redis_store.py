"""Redis backend: one Redis shared by many proxy replicas and job workers.

Every key starts with a prefix (``dpicl:`` by default) so one Redis can hold several deployments:

============================  ===============================================================
``{p}schema``                 layout version (``2``); a schema-1 layout is refused
``{p}pop:{name}``             population of a dataset name: budget, last version (JSON)
``{p}pops``                   set of dataset names
``{p}ds:{id}``                dataset metadata without the budget (JSON string)
``{p}ds:ids``                 set of dataset ids
``{p}rows:{id}``              list of rows, each ``[text, label, unit]`` JSON (private; own key)
``{p}upload:{id}``            staging mark of an upload in progress (expires; proxy.store.uploads)
``{p}uploads``                set of the ids being staged
``{p}ledger:{name}``          list of ledger entries (JSON); entry ``seq`` = list index + 1
``{p}audit``, ``{p}audit:seq``  sorted set of audit records by seq; the seq counter
``{p}demo:{key}``             cached demonstration set ``{dataset_id, task, payload}``
``{p}widths:{id}``            hash: tokenizer -> DP row-length release JSON (proxy.store.keyed_releases)
``{p}clusters:{id}``          hash: key -> per-label cluster release JSON (proxy.store.keyed_releases)
``{p}demos:ds:{id}``          set of demo keys of a dataset; ``{p}demos:task:{task}`` by task
``{p}tasks``                  hash: task name -> spec JSON
``{p}client_keys``            hash: client key name -> record JSON (the key's SHA-256, not the key)
``{p}job:{id}``, ``{p}jobs``  job record JSON; sorted set of job ids by creation time
``{p}warmup:{id}``            warm-up record JSON; ``{p}warmups``: sorted set of ids by creation
``{p}warmup-active:{dedupe}`` id of the active (queued/running) warm-up with that dedupe key
``{p}blob:{key}``             raw bytes of a job result
============================  ===============================================================

Atomicity: multi-key writes are ``MULTI``/``EXEC`` transactions (all or nothing). Read-modify-
write operations (``append_ledger``, ``set_budget``, ``set_noisy_counts``, ``update_job``,
``delete_dataset``) are
optimistic: ``WATCH`` the keys, read, decide, then ``MULTI``/``EXEC``; if any watched key changed
in between, Redis discards the transaction and we start again from a fresh read (for the ledger
that means the budget check runs again on the new ledger).
"""

from __future__ import annotations

import json
import random
import time
from typing import Any, Callable, Sequence, TypeVar

import redis

from proxy.store.base import (
    RESET_EVENT,
    SCHEMA_VERSION,
    AuditEntry,
    BudgetCheck,
    BudgetSetCheck,
    Charge,
    DatasetMeta,
    LedgerEntry,
    NotFound,
    Population,
    SchemaError,
    Store,
    StoreError,
    demo_filter,
)
from proxy.store.client_keys import RedisClientKeys
from proxy.store.keyed_releases import KINDS, RedisKeyedReleases
from proxy.store.redis_uploads import RedisUploads
from proxy.store.warmups import RedisWarmups
from proxy.store.redis_url import split_prefix

T = TypeVar("T")

#: Optimistic transactions give up after this many conflicts (each conflict means another
#: client made progress, so this only trips under pathological contention).
_MAX_ATTEMPTS = 10_000


class RedisStore(RedisClientKeys, RedisWarmups, RedisUploads, RedisKeyedReleases, Store):
    """:class:`~proxy.store.base.Store` on Redis (``redis://host:port/db``; ``?prefix=`` optional)."""

    def __init__(self, url: str, prefix: str | None = None, socket_timeout: float = 30.0):
        url, url_prefix = split_prefix(url)
        self.prefix = url_prefix if prefix is None else prefix
        # The connection pool is thread-safe and re-creates connections after fork().
        self.r = redis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=5.0)
        self._check_schema()

    def _check_schema(self) -> None:
        """Refuse a schema-1 layout (budgets per dataset id) instead of silently mixing layouts."""
        try:
            found = self.r.get(self._k("schema"))
            if found is None:
                if self.r.exists(self._k("ds", "versions"), self._k("ds", "ids")):
                    raise SchemaError(
                        f"the Redis store under prefix {self.prefix!r} has the schema-1 layout (budgets per dataset "
                        f"id); this version needs schema {SCHEMA_VERSION} (budgets per dataset name): use a new "
                        f"prefix and re-upload, see docs/stores.md")
                self.r.set(self._k("schema"), str(SCHEMA_VERSION), nx=True)
            elif found.decode() != str(SCHEMA_VERSION):
                raise SchemaError(f"the Redis store under prefix {self.prefix!r} has schema {found.decode()}; this "
                                  f"version reads schema {SCHEMA_VERSION} only (docs/stores.md)")
        except (redis.RedisError, OSError):
            return  # unreachable now: readiness reports it; the layout is checked on the next open

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

    def _meta_from(self, raw: bytes, pop: Population | None = None) -> DatasetMeta:
        d = json.loads(raw)
        pop = pop or self._pop(d["name"])
        return DatasetMeta(**d, budget_epsilon=pop.budget_epsilon, budget_delta=pop.budget_delta)

    @staticmethod
    def _meta_json(meta: DatasetMeta) -> str:
        return json.dumps({
            "id": meta.id, "name": meta.name, "version": int(meta.version), "rows": int(meta.rows),
            "labels": list(meta.labels), "created_at": float(meta.created_at), "public": bool(meta.public),
            "noisy_counts": meta.noisy_counts, "units": meta.units,
        })

    def _pop_from(self, raw: bytes | None, name: str, versions: list[str] | None = None) -> Population:
        if raw is None:
            raise NotFound(f"dataset name {name} not found")
        d = json.loads(raw)
        return Population(d["name"], float(d["budget_epsilon"]), float(d["budget_delta"]), int(d["last_version"]),
                          float(d["created_at"]), list(versions or []))

    def _pop(self, name: str, client: Any = None) -> Population:
        return self._pop_from((client or self.r).get(self._k("pop", name)), name)

    @staticmethod
    def _pop_json(pop: Population) -> str:
        return json.dumps({"name": pop.name, "budget_epsilon": pop.budget_epsilon, "budget_delta": pop.budget_delta,
                           "last_version": pop.last_version, "created_at": pop.created_at})

    # -- datasets -----------------------------------------------------------------------
    def get_dataset(self, dataset_id: str) -> DatasetMeta:
        raw = self.r.get(self._k("ds", dataset_id))
        if raw is None:
            raise NotFound(f"dataset {dataset_id} not found")
        return self._meta_from(raw)

    def _raw_metas(self) -> list[dict[str, Any]]:
        ids = sorted(i.decode() for i in self.r.smembers(self._k("ds", "ids")))
        if not ids:
            return []
        return [json.loads(raw) for raw in self.r.mget([self._k("ds", i) for i in ids]) if raw is not None]

    def list_datasets(self) -> list[DatasetMeta]:
        docs = self._raw_metas()
        names = sorted({d["name"] for d in docs})
        pops = {n: self._pop_from(raw, n) for n, raw in zip(names, self.r.mget([self._k("pop", n) for n in names])
                                                            if names else [])}
        metas = [DatasetMeta(**d, budget_epsilon=pops[d["name"]].budget_epsilon,
                             budget_delta=pops[d["name"]].budget_delta) for d in docs]
        return sorted(metas, key=lambda m: (m.created_at, m.id))

    def load_rows(self, dataset_id: str, units: bool = False) -> list[tuple[Any, ...]]:
        with self.r.pipeline(transaction=True) as pipe:  # one snapshot of metadata and rows
            pipe.exists(self._k("ds", dataset_id))
            pipe.lrange(self._k("rows", dataset_id), 0, -1)
            exists, raw = pipe.execute()
        if not exists:
            raise NotFound(f"dataset {dataset_id} not found")
        out = []
        for x in raw:
            t, lab, *rest = json.loads(x)
            out.append((t, lab, rest[0] if rest else None) if units else (t, lab))
        return out

    def delete_dataset(self, dataset_id: str) -> None:
        meta_key, by_ds = self._k("ds", dataset_id), self._k("demos", "ds", dataset_id)

        def txn(pipe: redis.client.Pipeline) -> None:
            if not pipe.exists(meta_key):
                raise NotFound(f"dataset {dataset_id} not found")
            demo_keys = [self._k("demo", k.decode()) for k in pipe.smembers(by_ds)]
            pipe.multi()
            # The population and its ledger are deliberately kept: spend on deleted data is still
            # spend on the same people, and a re-upload under the name continues it.
            pipe.delete(meta_key, self._k("rows", dataset_id), by_ds,
                        *(self._k(kind.hash, dataset_id) for kind in KINDS), *demo_keys)
            pipe.srem(self._k("ds", "ids"), dataset_id)

        self._transaction(txn, meta_key, by_ds)

    def set_noisy_counts(self, dataset_id: str, counts: dict[str, float]) -> dict[str, float]:
        meta_key = self._k("ds", dataset_id)

        def txn(pipe: redis.client.Pipeline) -> dict[str, float]:
            raw = pipe.get(meta_key)
            if raw is None:
                raise NotFound(f"dataset {dataset_id} not found")
            doc = json.loads(raw)
            if doc.get("noisy_counts") is not None:
                pipe.multi()
                return dict(doc["noisy_counts"])  # an earlier release won (both were charged)
            doc["noisy_counts"] = dict(counts)
            pipe.multi()
            pipe.set(meta_key, json.dumps(doc))
            return dict(counts)

        return self._transaction(txn, meta_key)

    # -- populations ----------------------------------------------------------------------
    def _versions(self, name: str) -> list[str]:
        docs = [d for d in self._raw_metas() if d["name"] == name]
        return [d["id"] for d in sorted(docs, key=lambda d: d["version"])]

    def get_population(self, name: str) -> Population:
        return self._pop_from(self.r.get(self._k("pop", name)), name, self._versions(name))

    def list_populations(self) -> list[Population]:
        names = sorted(n.decode() for n in self.r.smembers(self._k("pops")))
        return [self.get_population(n) for n in names]

    def set_budget(self, name: str, epsilon: float, delta: float, check: BudgetSetCheck) -> Population:
        pop_key, ledger_key = self._k("pop", name), self._k("ledger", name)

        def txn(pipe: redis.client.Pipeline) -> Population:
            pop = self._pop(name, pipe)
            pop.versions = self._versions(name)
            check(pop, [self._entry(x) for x in pipe.lrange(ledger_key, 0, -1)])
            pop.budget_epsilon, pop.budget_delta = float(epsilon), float(delta)
            pipe.multi()
            pipe.set(pop_key, self._pop_json(pop))
            return pop

        # Watching the ledger too: a charge appended meanwhile forces the check to run again.
        return self._transaction(txn, pop_key, ledger_key)

    # -- ledger -------------------------------------------------------------------------
    @staticmethod
    def _entry(raw: bytes) -> LedgerEntry:
        return LedgerEntry(**json.loads(raw))

    def ledger(self, name: str, after_seq: int = 0) -> list[LedgerEntry]:
        # seq = index + 1, so entries after ``after_seq`` start at index ``after_seq``.
        return [self._entry(x) for x in self.r.lrange(self._k("ledger", name), max(0, int(after_seq)), -1)]

    def append_ledger(self, dataset_id: str, charges: Sequence[Charge], actor: str, reason: str,
                      check: BudgetCheck, kind: str = "charge", ref: str = "") -> list[LedgerEntry]:
        meta_key = self._k("ds", dataset_id)
        raw = self.r.get(meta_key)
        if raw is None:
            raise NotFound(f"dataset {dataset_id} not found")
        name = json.loads(raw)["name"]
        pop_key, ledger_key = self._k("pop", name), self._k("ledger", name)

        def txn(pipe: redis.client.Pipeline) -> list[LedgerEntry]:
            raw_meta = pipe.get(meta_key)
            if raw_meta is None:
                raise NotFound(f"dataset {dataset_id} not found")
            meta = self._meta_from(raw_meta, self._pop(name, pipe))
            current = [self._entry(x) for x in pipe.lrange(ledger_key, 0, -1)]
            epsilon_after = float(check(meta, current))
            now = time.time()
            new = [LedgerEntry(len(current) + i + 1, dataset_id, ch.partition, dict(ch.event), epsilon_after,
                               actor, reason, now, name, kind, ref) for i, ch in enumerate(charges)]
            pipe.multi()
            if new:
                pipe.rpush(ledger_key, *(json.dumps(e.__dict__) for e in new))
            return new

        # Watching the metadata and the budget too: a concurrent budget change or deletion forces
        # a re-check.
        return self._transaction(txn, meta_key, pop_key, ledger_key)

    def reset_ledger(self, name: str, actor: str, reason: str) -> LedgerEntry:
        ledger_key = self._k("ledger", name)

        def txn(pipe: redis.client.Pipeline) -> LedgerEntry:
            self._pop(name, pipe)  # NotFound for an unknown name
            entry = LedgerEntry(int(pipe.llen(ledger_key)) + 1, "", "*", dict(RESET_EVENT), 0.0, actor, reason,
                                time.time(), name, "reset", "")
            pipe.multi()
            pipe.rpush(ledger_key, json.dumps(entry.__dict__))
            return entry

        return self._transaction(txn, ledger_key)

    # -- audit log ----------------------------------------------------------------------
    def append_audit(self, actor: str, action: str, target: str, details: dict[str, Any]) -> AuditEntry:
        seq = int(self.r.incr(self._k("audit", "seq")))
        entry = AuditEntry(seq, time.time(), actor, action, target, dict(details))
        self.r.zadd(self._k("audit"), {json.dumps(entry.__dict__): seq})
        return entry

    def audit(self, limit: int = 100, before: int | None = None) -> list[AuditEntry]:
        top = "+inf" if before is None else f"({int(before)}"
        raws = self.r.zrevrangebyscore(self._k("audit"), top, "-inf", start=0, num=max(0, int(limit)))
        return [AuditEntry(**json.loads(x)) for x in raws]

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
        demo_filter(key, dataset_id, task)  # same validation as SQLite (needs some filter)
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
