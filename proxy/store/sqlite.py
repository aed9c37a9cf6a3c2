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
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from proxy.store.base import (
    BudgetCheck,
    Charge,
    DatasetMeta,
    LedgerEntry,
    NotFound,
    Store,
    StoreError,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dataset_names (
    name TEXT PRIMARY KEY,
    last_version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS datasets (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    labels TEXT NOT NULL,
    budget_epsilon REAL NOT NULL,
    budget_delta REAL NOT NULL,
    created_at REAL NOT NULL,
    public INTEGER NOT NULL DEFAULT 0,
    noisy_counts TEXT
);
CREATE TABLE IF NOT EXISTS dataset_rows (
    dataset_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    text TEXT NOT NULL,
    label TEXT NOT NULL,
    PRIMARY KEY (dataset_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ledger (
    dataset_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    partition TEXT NOT NULL,
    event TEXT NOT NULL,
    epsilon_after REAL NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (dataset_id, seq)
) WITHOUT ROWID;
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
CREATE TABLE IF NOT EXISTS client_keys (
    name TEXT PRIMARY KEY,
    record TEXT NOT NULL
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
"""


def new_dataset_id() -> str:
    """A fresh dataset id, ``ds_`` + 16 random hex digits."""
    return "ds_" + secrets.token_hex(8)


class SqliteStore(Store):
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
        # One transaction, so processes opening a new file at once see the whole schema or none.
        conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")

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
        """A transaction: committed on success, rolled back (nothing written) on any error."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
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
    @staticmethod
    def _meta(row: sqlite3.Row | tuple) -> DatasetMeta:
        (id_, name, version, rows, labels, eps, delta, created, public, noisy) = row
        return DatasetMeta(
            id=id_, name=name, version=int(version), rows=int(rows), labels=json.loads(labels),
            budget_epsilon=float(eps), budget_delta=float(delta), created_at=float(created),
            public=bool(public), noisy_counts=json.loads(noisy) if noisy is not None else None,
        )

    _META_COLS = "id, name, version, rows, labels, budget_epsilon, budget_delta, created_at, public, noisy_counts"

    def create_dataset(self, name: str, rows: Sequence[tuple[str, str]], budget_epsilon: float,
                       budget_delta: float, public: bool = False) -> DatasetMeta:
        rows = [(str(t), str(lab)) for t, lab in rows]
        labels = sorted({lab for _, lab in rows})
        with self._tx() as c:
            found = c.execute("SELECT last_version FROM dataset_names WHERE name = ?", (name,)).fetchone()
            version = (found[0] if found else 0) + 1
            c.execute("INSERT INTO dataset_names (name, last_version) VALUES (?, ?) "
                      "ON CONFLICT(name) DO UPDATE SET last_version = excluded.last_version", (name, version))
            meta = DatasetMeta(new_dataset_id(), name, version, len(rows), labels, float(budget_epsilon),
                               float(budget_delta), time.time(), bool(public), None)
            c.execute(f"INSERT INTO datasets ({self._META_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (meta.id, meta.name, meta.version, meta.rows, json.dumps(meta.labels), meta.budget_epsilon,
                       meta.budget_delta, meta.created_at, int(meta.public), None))
            c.executemany("INSERT INTO dataset_rows (dataset_id, idx, text, label) VALUES (?, ?, ?, ?)",
                          ((meta.id, i, t, lab) for i, (t, lab) in enumerate(rows)))
        return meta

    def get_dataset(self, dataset_id: str) -> DatasetMeta:
        row = self._conn().execute(f"SELECT {self._META_COLS} FROM datasets WHERE id = ?", (dataset_id,)).fetchone()
        if row is None:
            raise NotFound(f"dataset {dataset_id} not found")
        return self._meta(row)

    def list_datasets(self) -> list[DatasetMeta]:
        cur = self._conn().execute(f"SELECT {self._META_COLS} FROM datasets ORDER BY created_at, id")
        return [self._meta(r) for r in cur.fetchall()]

    def load_rows(self, dataset_id: str) -> list[tuple[str, str]]:
        # One read transaction so metadata and rows are from the same snapshot.
        with self._tx(immediate=False) as c:
            if c.execute("SELECT 1 FROM datasets WHERE id = ?", (dataset_id,)).fetchone() is None:
                raise NotFound(f"dataset {dataset_id} not found")
            cur = c.execute("SELECT text, label FROM dataset_rows WHERE dataset_id = ? ORDER BY idx", (dataset_id,))
            return [(t, lab) for t, lab in cur.fetchall()]

    def delete_dataset(self, dataset_id: str) -> None:
        with self._tx() as c:
            if c.execute("DELETE FROM datasets WHERE id = ?", (dataset_id,)).rowcount == 0:
                raise NotFound(f"dataset {dataset_id} not found")
            c.execute("DELETE FROM dataset_rows WHERE dataset_id = ?", (dataset_id,))
            c.execute("DELETE FROM demos WHERE dataset_id = ?", (dataset_id,))
            # The ledger stays: spend on deleted data is still spend (and the audit trail).

    def update_dataset(self, meta: DatasetMeta) -> None:
        with self._tx() as c:
            cur = c.execute(
                "UPDATE datasets SET name = ?, version = ?, rows = ?, labels = ?, budget_epsilon = ?, "
                "budget_delta = ?, public = ?, noisy_counts = ? WHERE id = ?",
                (meta.name, meta.version, meta.rows, json.dumps(list(meta.labels)), float(meta.budget_epsilon),
                 float(meta.budget_delta), int(meta.public),
                 json.dumps(meta.noisy_counts) if meta.noisy_counts is not None else None, meta.id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"dataset {meta.id} not found")

    # -- ledger -------------------------------------------------------------------------
    @staticmethod
    def _entry(dataset_id: str, row: tuple) -> LedgerEntry:
        seq, partition, event, eps, actor, reason, created = row
        return LedgerEntry(int(seq), dataset_id, partition, json.loads(event), float(eps), actor, reason,
                           float(created))

    def _ledger(self, c: sqlite3.Connection, dataset_id: str, after_seq: int) -> list[LedgerEntry]:
        cur = c.execute(
            "SELECT seq, partition, event, epsilon_after, actor, reason, created_at FROM ledger "
            "WHERE dataset_id = ? AND seq > ? ORDER BY seq", (dataset_id, int(after_seq)))
        return [self._entry(dataset_id, r) for r in cur.fetchall()]

    def ledger(self, dataset_id: str, after_seq: int = 0) -> list[LedgerEntry]:
        return self._ledger(self._conn(), dataset_id, after_seq)

    def append_ledger(self, dataset_id: str, charges: Sequence[Charge], actor: str, reason: str,
                      check: BudgetCheck) -> list[LedgerEntry]:
        # BEGIN IMMEDIATE takes the write lock before the ledger is read: no other process can
        # append between our read, the check and our insert.
        with self._tx(immediate=True) as c:
            row = c.execute(f"SELECT {self._META_COLS} FROM datasets WHERE id = ?", (dataset_id,)).fetchone()
            if row is None:
                raise NotFound(f"dataset {dataset_id} not found")
            current = self._ledger(c, dataset_id, 0)
            epsilon_after = float(check(self._meta(row), current))
            seq0 = current[-1].seq if current else 0
            now = time.time()
            new = [LedgerEntry(seq0 + i + 1, dataset_id, ch.partition, dict(ch.event), epsilon_after, actor, reason,
                               now) for i, ch in enumerate(charges)]
            c.executemany(
                "INSERT INTO ledger (dataset_id, seq, partition, event, epsilon_after, actor, reason, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(e.dataset_id, e.seq, e.partition, json.dumps(e.event), e.epsilon_after, e.actor, e.reason,
                  e.created_at) for e in new])
        return new

    # -- demonstration cache ------------------------------------------------------------
    def get_demos(self, key: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT payload FROM demos WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put_demos(self, key: str, dataset_id: str, task: str, payload: dict[str, Any]) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO demos (key, dataset_id, task, payload, created_at) VALUES (?, ?, ?, ?, ?)",
                      (key, dataset_id, task, json.dumps(payload), time.time()))

    def delete_demos(self, key: str | None = None, dataset_id: str | None = None, task: str | None = None) -> int:
        where, args = _demo_filter(key, dataset_id, task)
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

    # -- client keys --------------------------------------------------------------------
    def add_client_key(self, name: str, record: dict[str, Any]) -> bool:
        with self._tx() as c:
            cur = c.execute("INSERT OR IGNORE INTO client_keys (name, record) VALUES (?, ?)", (name, json.dumps(record)))
            return cur.rowcount > 0

    def list_client_keys(self) -> dict[str, dict[str, Any]]:
        cur = self._conn().execute("SELECT name, record FROM client_keys ORDER BY name")
        return {name: json.loads(record) for name, record in cur.fetchall()}

    def delete_client_key(self, name: str) -> bool:
        with self._tx() as c:
            return c.execute("DELETE FROM client_keys WHERE name = ?", (name,)).rowcount > 0

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


def _demo_filter(key: str | None, dataset_id: str | None, task: str | None) -> tuple[str, list[str]]:
    """SQL condition for :meth:`SqliteStore.delete_demos` (filters combine with AND)."""
    clauses, args = [], []
    for column, value in (("key", key), ("dataset_id", dataset_id), ("task", task)):
        if value is not None:
            clauses.append(f"{column} = ?")
            args.append(value)
    if not clauses:
        # Regenerating demonstrations costs budget: never drop the whole cache by accident.
        raise ValueError("delete_demos needs a key, a dataset id or a task")
    return " AND ".join(clauses), args
