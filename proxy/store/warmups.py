"""Warm-up records (demonstration-set generations as resources) for both backends (mixins).

A record is the JSON the serving layer writes (:mod:`proxy.serving.warmups`): ids, states, numbers,
task and dataset names, errors of our own making; never private text. Two operations need care:
``create_warmup`` deduplicates on a key atomically (one active warm-up per demonstration set across
every process), and ``update_warmup`` is a compare-and-set on the state, so a cancel and a worker
taking the same queued warm-up cannot both win.
"""

from __future__ import annotations

import json
import time
from typing import Any, Sequence


from proxy.store.base import ACTIVE_WARMUP_STATES, NotFound

#: The SQLite table (part of the SQLite store's schema).
SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS warmups (
    id TEXT PRIMARY KEY,
    dedupe TEXT,
    state TEXT NOT NULL,
    record TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS warmups_by_dedupe ON warmups (dedupe, state);
"""


class SqliteWarmups:
    """The warm-up operations of :class:`proxy.store.base.Store` on the SQLite store."""

    def create_warmup(self, record: dict[str, Any], dedupe: str | None = None) -> tuple[dict[str, Any], bool]:
        active = ", ".join("?" * len(ACTIVE_WARMUP_STATES))
        with self._tx(immediate=True) as c:  # type: ignore[attr-defined]
            if dedupe is not None:
                row = c.execute(f"SELECT record FROM warmups WHERE dedupe = ? AND state IN ({active}) "
                                "ORDER BY created_at LIMIT 1", (dedupe, *ACTIVE_WARMUP_STATES)).fetchone()
                if row is not None:
                    return json.loads(row[0]), False
            record = {**record, "dedupe": dedupe}
            c.execute("INSERT INTO warmups (id, dedupe, state, record, created_at) VALUES (?, ?, ?, ?, ?)",
                      (record["id"], dedupe, record["state"], json.dumps(record), time.time()))
        return record, True

    def get_warmup(self, warmup_id: str) -> dict[str, Any] | None:
        row = self._conn().execute(  # type: ignore[attr-defined]
            "SELECT record FROM warmups WHERE id = ?", (warmup_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def list_warmups(self, limit: int = 200) -> list[dict[str, Any]]:
        cur = self._conn().execute(  # type: ignore[attr-defined]
            "SELECT record FROM warmups ORDER BY created_at DESC, id DESC LIMIT ?", (int(limit),))
        return [json.loads(r[0]) for r in cur.fetchall()]

    def update_warmup(self, warmup_id: str, expect: Sequence[str] | None = None, **fields: Any) -> dict[str, Any] | None:
        with self._tx(immediate=True) as c:  # type: ignore[attr-defined]
            row = c.execute("SELECT record FROM warmups WHERE id = ?", (warmup_id,)).fetchone()
            if row is None:
                raise NotFound(f"warm-up {warmup_id} not found")
            record = json.loads(row[0])
            if expect is not None and record.get("state") not in expect:
                return None
            record.update(fields)
            c.execute("UPDATE warmups SET record = ?, state = ? WHERE id = ?",
                      (json.dumps(record), record["state"], warmup_id))
        return record


class RedisWarmups:
    """The same on Redis: ``{p}warmup:{id}`` records, the ``{p}warmups`` sorted set by creation and
    ``{p}warmup-active:{dedupe}`` pointing at the active warm-up of a key (WATCH/MULTI)."""

    def create_warmup(self, record: dict[str, Any], dedupe: str | None = None) -> tuple[dict[str, Any], bool]:
        wkey = self._k("warmup", record["id"])
        if dedupe is None:
            with self.r.pipeline(transaction=True) as pipe:
                pipe.set(wkey, json.dumps(record))
                pipe.zadd(self._k("warmups"), {record["id"]: time.time()})
                pipe.execute()
            return dict(record), True
        akey = self._k("warmup-active", dedupe)

        def txn(pipe: Any) -> tuple[dict[str, Any], bool]:
            current = pipe.get(akey)
            if current is not None:
                raw = pipe.get(self._k("warmup", current.decode()))
                if raw is not None:
                    existing = json.loads(raw)
                    if existing.get("state") in ACTIVE_WARMUP_STATES:
                        pipe.multi()  # nothing to write; EXEC of an empty transaction
                        return existing, False
            pipe.multi()
            pipe.set(wkey, json.dumps({**record, "dedupe": dedupe}))
            pipe.zadd(self._k("warmups"), {record["id"]: time.time()})
            pipe.set(akey, record["id"])
            return {**record, "dedupe": dedupe}, True

        return self._transaction(txn, akey)

    def get_warmup(self, warmup_id: str) -> dict[str, Any] | None:
        raw = self.r.get(self._k("warmup", warmup_id))
        return json.loads(raw) if raw is not None else None

    def list_warmups(self, limit: int = 200) -> list[dict[str, Any]]:
        ids = [i.decode() for i in self.r.zrevrange(self._k("warmups"), 0, max(0, int(limit) - 1))]
        if not ids:
            return []
        return [json.loads(raw) for raw in self.r.mget([self._k("warmup", i) for i in ids]) if raw is not None]

    def update_warmup(self, warmup_id: str, expect: Sequence[str] | None = None, **fields: Any) -> dict[str, Any] | None:
        wkey = self._k("warmup", warmup_id)

        def txn(pipe: Any) -> dict[str, Any] | None:
            raw = pipe.get(wkey)
            if raw is None:
                raise NotFound(f"warm-up {warmup_id} not found")
            record = json.loads(raw)
            if expect is not None and record.get("state") not in expect:
                pipe.multi()
                return None
            record.update(fields)
            dedupe = record.get("dedupe")
            akey = self._k("warmup-active", dedupe) if dedupe else None
            owner = pipe.get(akey) if akey else None
            pipe.multi()
            pipe.set(wkey, json.dumps(record))
            if akey and record.get("state") not in ACTIVE_WARMUP_STATES and owner is not None \
                    and owner.decode() == warmup_id:
                pipe.delete(akey)
            return record

        return self._transaction(txn, wkey)
