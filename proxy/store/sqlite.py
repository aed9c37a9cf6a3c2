"""SQLite backend: the embedded default, one file, safe across threads and processes.

* WAL journal: readers never block the (single) writer, so budget reads stay cheap while a
  reservation is being written.
* Every write is one transaction; ``append_ledger`` and ``update_job`` use ``BEGIN IMMEDIATE``,
  which takes the database write lock *before* reading, so read-check-append is atomic across all
  processes sharing the file (others wait up to ``timeout`` seconds).
* ``synchronous=FULL``: a committed ledger entry survives a power cut. Losing a recorded spend
  after its demonstrations were released would under-count privacy loss, which we never accept
  for a little write speed.
* One connection per thread (and per process: a connection inherited through ``fork`` is never
  reused).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from proxy.store.base import (
    RESET_EVENT,
    AuditEntry,
    BudgetCheck,
    BudgetSetCheck,
    Charge,
    DatasetMeta,
    LedgerEntry,
    NotFound,
    Population,
    Store,
    StoreBusy,
    StoreError,
    demo_filter,
)
from proxy.store.client_keys import SQLITE_SCHEMA, SqliteClientKeys
from proxy.store.keyed_releases import KINDS, SQLITE_SCHEMA as RELEASES_SCHEMA, SqliteKeyedReleases
from proxy.store.sqlite_migrate import ROWS_TABLE, migrate_if_needed, rebuild_rows_table
from proxy.store.sqlite_uploads import SQLITE_SCHEMA as UPLOADS_SCHEMA
from proxy.store.sqlite_uploads import SqliteUploads
from proxy.store.warmups import SQLITE_SCHEMA as WARMUPS_SCHEMA
from proxy.store.warmups import SqliteWarmups

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_info (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS populations (
    name TEXT PRIMARY KEY,
    last_version INTEGER NOT NULL,
    budget_epsilon REAL NOT NULL,
    budget_delta REAL NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS datasets (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    units INTEGER NOT NULL,
    labels TEXT NOT NULL,
    created_at REAL NOT NULL,
    public INTEGER NOT NULL DEFAULT 0,
    noisy_counts TEXT
);
CREATE INDEX IF NOT EXISTS datasets_by_name ON datasets (name);
CREATE TABLE IF NOT EXISTS ledger (
    name TEXT NOT NULL,
    seq INTEGER NOT NULL,
    dataset_id TEXT NOT NULL,
    partition TEXT NOT NULL,
    event TEXT NOT NULL,
    epsilon_after REAL NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at REAL NOT NULL,
    kind TEXT NOT NULL DEFAULT 'charge',
    ref TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (name, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    details TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS demos (
    key TEXT PRIMARY KEY,
    dataset_id TEXT NOT NULL,
    task TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS demos_by_dataset ON demos (dataset_id);
CREATE INDEX IF NOT EXISTS demos_by_task ON demos (task);
CREATE TABLE IF NOT EXISTS tasks (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    record TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS blobs (
    key TEXT PRIMARY KEY,
    data BLOB NOT NULL
);
INSERT OR IGNORE INTO schema_info (key, value) VALUES ('version', '2');
""" + ROWS_TABLE + ";" + SQLITE_SCHEMA + WARMUPS_SCHEMA + UPLOADS_SCHEMA + RELEASES_SCHEMA


def _busy(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite gave up waiting for a lock (SQLITE_BUSY / SQLITE_LOCKED)."""
    text = str(exc)
    return "locked" in text or "busy" in text


class SqliteStore(SqliteClientKeys, SqliteWarmups, SqliteUploads, SqliteKeyedReleases, Store):
    """:class:`~proxy.store.base.Store` on one SQLite file (created with its parent directory)."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 60.0):
        self.path = Path(path).expanduser().resolve()  # later chdir() must not move the store
        if str(path) == ":memory:":
            raise ValueError("SqliteStore needs a file (':memory:' is not shared between connections)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self._local = threading.local()
        self._all: list[tuple[int, sqlite3.Connection]] = []  # (pid that opened it, connection)
        self._all_lock = threading.Lock()
        conn = self._conn()
        self._enable_wal(conn)
        # A schema-1 file is copied to a backup next to it, then converted in one transaction;
        # a rows table from before issue 20 is rebuilt as a rowid table (one transaction).
        migrate_if_needed(conn, self.path, _SCHEMA)
        rebuild_rows_table(conn)
        # One transaction, so processes opening a new file at once see the whole schema or none.
        conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
        self.sweep_uploads()  # rows staged by a process that died mid-upload

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        """Switch the file to WAL (persistent); retried because the switch may report busy."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        if str(mode).lower() != "wal":  # pragma: no cover - e.g. a filesystem without shared memory
            raise StoreError(f"could not enable WAL on {self.path} (journal mode is {mode})")

    # -- connections and transactions ------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction is exactly the
        # block we write, and BEGIN IMMEDIATE can be used where the write lock must come first.
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        self._local.conn, self._local.pid = conn, os.getpid()
        with self._all_lock:
            self._all.append((os.getpid(), conn))
        return conn

    @contextmanager
    def _tx(self, immediate: bool = True) -> Iterator[sqlite3.Connection]:
        """A transaction: committed on success, rolled back (nothing written) on any error.

        A lock wait longer than ``timeout`` raises :class:`StoreBusy` (503 + Retry-After at the API).
        """
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
        except sqlite3.OperationalError as exc:
            if _busy(exc):
                raise StoreBusy(f"the SQLite store stayed locked for {self.timeout:g} s") from None
            raise
        try:
            yield conn
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError) and _busy(exc):
                raise StoreBusy("the SQLite store is locked by another writer") from None
            raise
        try:
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError) and _busy(exc):
                raise StoreBusy("the SQLite store is locked by another writer") from None
            raise

    def close(self) -> None:
        with self._all_lock:
            conns, self._all = self._all, []
        for pid, conn in conns:
            if pid != os.getpid():
                continue  # inherited through fork: SQLite forbids using (or closing) it here
            try:
                conn.close()
            except sqlite3.Error:  # pragma: no cover - closing is best effort
                pass
        self._local = threading.local()

    # -- datasets -----------------------------------------------------------------------
    _META_COLS = ("d.id, d.name, d.version, d.rows, d.labels, p.budget_epsilon, p.budget_delta, d.created_at, "
                  "d.public, d.noisy_counts, d.units")
    _META_FROM = "datasets d JOIN populations p ON p.name = d.name"

    @staticmethod
    def _meta(row: sqlite3.Row | tuple) -> DatasetMeta:
        (id_, name, version, rows, labels, eps, delta, created, public, noisy, units) = row
        return DatasetMeta(
            id=id_, name=name, version=int(version), rows=int(rows), labels=json.loads(labels),
            budget_epsilon=float(eps), budget_delta=float(delta), created_at=float(created),
            public=bool(public), noisy_counts=json.loads(noisy) if noisy is not None else None,
            units=int(units),
        )

    def get_dataset(self, dataset_id: str) -> DatasetMeta:
        row = self._conn().execute(f"SELECT {self._META_COLS} FROM {self._META_FROM} WHERE d.id = ?",
                                   (dataset_id,)).fetchone()
        if row is None:
            raise NotFound(f"dataset {dataset_id} not found")
        return self._meta(row)

    def list_datasets(self) -> list[DatasetMeta]:
        cur = self._conn().execute(f"SELECT {self._META_COLS} FROM {self._META_FROM} ORDER BY d.created_at, d.id")
        return [self._meta(r) for r in cur.fetchall()]

    def load_rows(self, dataset_id: str, units: bool = False) -> list[tuple[Any, ...]]:
        # One read transaction so metadata and rows are from the same snapshot.
        with self._tx(immediate=False) as c:
            if c.execute("SELECT 1 FROM datasets WHERE id = ?", (dataset_id,)).fetchone() is None:
                raise NotFound(f"dataset {dataset_id} not found")
            cur = c.execute("SELECT text, label, unit FROM dataset_rows WHERE dataset_id = ? ORDER BY idx",
                            (dataset_id,))
            return [(t, lab, u) if units else (t, lab) for t, lab, u in cur.fetchall()]

    def delete_dataset(self, dataset_id: str) -> None:
        with self._tx() as c:
            if c.execute("DELETE FROM datasets WHERE id = ?", (dataset_id,)).rowcount == 0:
                raise NotFound(f"dataset {dataset_id} not found")
            c.execute("DELETE FROM dataset_rows WHERE dataset_id = ?", (dataset_id,))
            c.execute("DELETE FROM demos WHERE dataset_id = ?", (dataset_id,))
            for kind in KINDS:
                c.execute(f"DELETE FROM {kind.table} WHERE dataset_id = ?", (dataset_id,))
            # The population (budget, last version) and its ledger stay: spend on deleted data is
            # still spend on the same people, and a re-upload under the name continues it.

    def set_noisy_counts(self, dataset_id: str, counts: dict[str, float]) -> dict[str, float]:
        with self._tx() as c:
            row = c.execute("SELECT noisy_counts FROM datasets WHERE id = ?", (dataset_id,)).fetchone()
            if row is None:
                raise NotFound(f"dataset {dataset_id} not found")
            if row[0] is not None:
                return dict(json.loads(row[0]))  # an earlier release won (both were charged)
            c.execute("UPDATE datasets SET noisy_counts = ? WHERE id = ?", (json.dumps(counts), dataset_id))
        return dict(counts)

    # -- populations ----------------------------------------------------------------------
    def _population(self, c: sqlite3.Connection, name: str) -> Population:
        row = c.execute("SELECT name, budget_epsilon, budget_delta, last_version, created_at FROM populations "
                        "WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"dataset name {name} not found")
        ids = [r[0] for r in c.execute("SELECT id FROM datasets WHERE name = ? ORDER BY version", (name,))]
        return Population(row[0], float(row[1]), float(row[2]), int(row[3]), float(row[4]), ids)

    def get_population(self, name: str) -> Population:
        with self._tx(immediate=False) as c:
            return self._population(c, name)

    def list_populations(self) -> list[Population]:
        with self._tx(immediate=False) as c:
            names = [r[0] for r in c.execute("SELECT name FROM populations ORDER BY name")]
            return [self._population(c, n) for n in names]

    def set_budget(self, name: str, epsilon: float, delta: float, check: BudgetSetCheck) -> Population:
        # BEGIN IMMEDIATE: no charge can be appended between the check and the write.
        with self._tx(immediate=True) as c:
            check(self._population(c, name), self._ledger(c, name, 0))
            c.execute("UPDATE populations SET budget_epsilon = ?, budget_delta = ? WHERE name = ?",
                      (float(epsilon), float(delta), name))
            return self._population(c, name)

    # -- ledger -------------------------------------------------------------------------
    _LEDGER_COLS = "seq, dataset_id, partition, event, epsilon_after, actor, reason, created_at, name, kind, ref"

    @staticmethod
    def _entry(row: tuple) -> LedgerEntry:
        seq, ds, partition, event, eps, actor, reason, created, name, kind, ref = row
        return LedgerEntry(int(seq), ds, partition, json.loads(event), float(eps), actor, reason, float(created),
                           name, kind, ref)

    def _ledger(self, c: sqlite3.Connection, name: str, after_seq: int) -> list[LedgerEntry]:
        cur = c.execute(f"SELECT {self._LEDGER_COLS} FROM ledger WHERE name = ? AND seq > ? ORDER BY seq",
                        (name, int(after_seq)))
        return [self._entry(r) for r in cur.fetchall()]

    def ledger(self, name: str, after_seq: int = 0) -> list[LedgerEntry]:
        return self._ledger(self._conn(), name, after_seq)

    def _insert(self, c: sqlite3.Connection, entries: Sequence[LedgerEntry]) -> None:
        c.executemany(
            f"INSERT INTO ledger ({self._LEDGER_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(e.seq, e.dataset_id, e.partition, json.dumps(e.event), e.epsilon_after, e.actor, e.reason,
              e.created_at, e.name, e.kind, e.ref) for e in entries])

    def append_ledger(self, dataset_id: str, charges: Sequence[Charge], actor: str, reason: str,
                      check: BudgetCheck, kind: str = "charge", ref: str = "") -> list[LedgerEntry]:
        # BEGIN IMMEDIATE takes the write lock before the ledger is read: no other process can
        # append (or change the budget) between our read, the check and our insert.
        with self._tx(immediate=True) as c:
            row = c.execute(f"SELECT {self._META_COLS} FROM {self._META_FROM} WHERE d.id = ?",
                            (dataset_id,)).fetchone()
            if row is None:
                raise NotFound(f"dataset {dataset_id} not found")
            meta = self._meta(row)
            current = self._ledger(c, meta.name, 0)
            epsilon_after = float(check(meta, current))
            seq0 = current[-1].seq if current else 0
            now = time.time()
            new = [LedgerEntry(seq0 + i + 1, dataset_id, ch.partition, dict(ch.event), epsilon_after, actor, reason,
                               now, meta.name, kind, ref) for i, ch in enumerate(charges)]
            self._insert(c, new)
        return new

    def reset_ledger(self, name: str, actor: str, reason: str) -> LedgerEntry:
        with self._tx(immediate=True) as c:
            self._population(c, name)  # NotFound for an unknown name
            last = c.execute("SELECT MAX(seq) FROM ledger WHERE name = ?", (name,)).fetchone()[0] or 0
            entry = LedgerEntry(int(last) + 1, "", "*", dict(RESET_EVENT), 0.0, actor, reason, time.time(), name,
                                "reset", "")
            self._insert(c, [entry])
        return entry

    # -- audit log ----------------------------------------------------------------------
    def append_audit(self, actor: str, action: str, target: str, details: dict[str, Any]) -> AuditEntry:
        now = time.time()
        with self._tx() as c:
            cur = c.execute("INSERT INTO audit (time, actor, action, target, details) VALUES (?, ?, ?, ?, ?)",
                            (now, actor, action, target, json.dumps(details)))
            seq = int(cur.lastrowid)
        return AuditEntry(seq, now, actor, action, target, dict(details))

    def audit(self, limit: int = 100, before: int | None = None) -> list[AuditEntry]:
        cur = self._conn().execute(
            "SELECT seq, time, actor, action, target, details FROM audit WHERE seq < ? ORDER BY seq DESC LIMIT ?",
            (int(before) if before is not None else 2**62, max(0, int(limit))))
        return [AuditEntry(int(s), float(t), a, act, tg, json.loads(d)) for s, t, a, act, tg, d in cur.fetchall()]

    # -- demonstration cache ------------------------------------------------------------
    def get_demos(self, key: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT payload FROM demos WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put_demos(self, key: str, dataset_id: str, task: str, payload: dict[str, Any]) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO demos (key, dataset_id, task, payload, created_at) VALUES (?, ?, ?, ?, ?)",
                      (key, dataset_id, task, json.dumps(payload), time.time()))

    def delete_demos(self, key: str | None = None, dataset_id: str | None = None, task: str | None = None) -> int:
        where, args = demo_filter(key, dataset_id, task)
        with self._tx() as c:
            return c.execute(f"DELETE FROM demos WHERE {where}", args).rowcount

    # -- tasks --------------------------------------------------------------------------
    def put_task(self, name: str, spec: dict[str, Any]) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO tasks (name, spec) VALUES (?, ?)", (name, json.dumps(spec)))

    def get_task(self, name: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT spec FROM tasks WHERE name = ?", (name,)).fetchone()
        return json.loads(row[0]) if row else None

    def list_tasks(self) -> dict[str, dict[str, Any]]:
        cur = self._conn().execute("SELECT name, spec FROM tasks ORDER BY name")
        return {name: json.loads(spec) for name, spec in cur.fetchall()}

    def delete_task(self, name: str) -> bool:
        with self._tx() as c:
            return c.execute("DELETE FROM tasks WHERE name = ?", (name,)).rowcount > 0

    # -- jobs ---------------------------------------------------------------------------
    def put_job(self, job_id: str, record: dict[str, Any]) -> None:
        with self._tx() as c:
            # Keep the first creation time so list_jobs() order is stable across rewrites.
            c.execute("INSERT INTO jobs (id, record, created_at) VALUES (?, ?, ?) "
                      "ON CONFLICT(id) DO UPDATE SET record = excluded.record",
                      (job_id, json.dumps(record), time.time()))

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def list_jobs(self) -> list[dict[str, Any]]:
        cur = self._conn().execute("SELECT record FROM jobs ORDER BY created_at, id")
        return [json.loads(r[0]) for r in cur.fetchall()]

    def update_job(self, job_id: str, **fields: Any) -> dict[str, Any]:
        with self._tx(immediate=True) as c:
            row = c.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"job {job_id} not found")
            record = {**json.loads(row[0]), **fields}
            c.execute("UPDATE jobs SET record = ? WHERE id = ?", (json.dumps(record), job_id))
        return record

    # -- blobs --------------------------------------------------------------------------
    def put_blob(self, key: str, data: bytes) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO blobs (key, data) VALUES (?, ?)", (key, sqlite3.Binary(bytes(data))))

    def get_blob(self, key: str) -> bytes | None:
        row = self._conn().execute("SELECT data FROM blobs WHERE key = ?", (key,)).fetchone()
        return bytes(row[0]) if row else None

    # -- operations ---------------------------------------------------------------------
    def ping(self) -> bool:
        try:
            return self._conn().execute("SELECT 1").fetchone() == (1,)
        except sqlite3.Error:
            return False
