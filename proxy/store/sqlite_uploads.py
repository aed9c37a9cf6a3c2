"""Staged uploads on the SQLite store (see :mod:`proxy.store.uploads` for the design).

Staged rows go straight into ``dataset_rows`` under the new id, one short ``BEGIN IMMEDIATE``
transaction per chunk; the ``uploads`` table marks the id as staging (owner pid, last touch).
Without a ``datasets`` row nothing reads them. The commit is one transaction that removes the
mark and inserts the metadata; a sweep deletes the rows of marks whose owner process is gone
(SQLite files are local, so a pid and its start time name a process) or that were untouched for
``STALE_SECONDS``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

from proxy.store.base import DatasetMeta, StagedUpload, StoreError
from proxy.store.uploads import CHUNK_ROWS, STALE_SECONDS, ChunkedCreate, Row

#: The SQLite table (part of the SQLite store's schema).
SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS uploads (
    dataset_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    started_at REAL NOT NULL,
    touched_at REAL NOT NULL
);
"""


def _started(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), "" where /proc is missing."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


def process_owner(pid: int | None = None) -> str:
    """``pid:start time``: names one process incarnation (a container's pid 1 after a restart is
    a different owner than before it)."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{_started(pid)}"


def _alive(owner: str) -> bool:
    """Whether the process that wrote ``owner`` still runs (unsure counts as alive: the mark then
    waits for ``STALE_SECONDS``)."""
    pid_text, _, started = owner.partition(":")
    try:
        pid = int(pid_text)
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (ValueError, PermissionError, OSError):
        return True
    return not started or _started(pid) in ("", started)


class SqliteStagedUpload(StagedUpload):
    """An upload in progress on a :class:`~proxy.store.sqlite.SqliteStore`."""

    def __init__(self, store: Any, name: str, budget_epsilon: float, budget_delta: float, public: bool,
                 labels: Sequence[str] | None):
        super().__init__(name, budget_epsilon, budget_delta, public, labels)
        self.store = store
        now = time.time()
        with store._tx() as c:
            c.execute("INSERT INTO uploads (dataset_id, owner, started_at, touched_at) VALUES (?, ?, ?, ?)",
                      (self.dataset_id, process_owner(), now, now))

    def _write(self, start: int, rows: list[Row]) -> None:
        # synchronous=NORMAL for staged chunks only: their commit skips the fsync, which the
        # publishing commit (synchronous=FULL) does for every WAL frame before it; a crash before
        # the publish loses only staged rows, which are swept anyway.
        conn = self.store._conn()
        conn.execute("PRAGMA synchronous=NORMAL")
        try:
            with self.store._tx() as c:
                if c.execute("UPDATE uploads SET touched_at = ? WHERE dataset_id = ?",
                             (time.time(), self.dataset_id)).rowcount == 0:
                    raise StoreError("the upload was abandoned (its staged rows were swept); upload again")
                c.executemany("INSERT INTO dataset_rows (dataset_id, idx, text, label, unit) VALUES (?, ?, ?, ?, ?)",
                              ((self.dataset_id, start + i, t, lab, u) for i, (t, lab, u) in enumerate(rows)))
        finally:
            conn.execute("PRAGMA synchronous=FULL")

    def _publish(self) -> DatasetMeta:
        store, name = self.store, self.name
        with store._tx() as c:
            if c.execute("DELETE FROM uploads WHERE dataset_id = ?", (self.dataset_id,)).rowcount == 0:
                raise StoreError("the upload was abandoned (its staged rows were swept); upload again")
            found = c.execute("SELECT last_version FROM populations WHERE name = ?", (name,)).fetchone()
            version = (found[0] if found else 0) + 1
            now = time.time()
            if found:
                c.execute("UPDATE populations SET last_version = ? WHERE name = ?", (version, name))
            else:
                c.execute("INSERT INTO populations (name, last_version, budget_epsilon, budget_delta, created_at) "
                          "VALUES (?, ?, ?, ?, ?)", (name, version, self.budget_epsilon, self.budget_delta, now))
            c.execute("INSERT INTO datasets (id, name, version, rows, units, labels, created_at, public, noisy_counts) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                      (self.dataset_id, name, version, self.rows, self.units, json.dumps(self.labels), now,
                       int(self.public)))
            row = c.execute(f"SELECT {store._META_COLS} FROM {store._META_FROM} WHERE d.id = ?",
                            (self.dataset_id,)).fetchone()
        return store._meta(row)

    def _discard(self) -> None:
        delete_staged(self.store, self.dataset_id)


def delete_staged(store: Any, dataset_id: str) -> None:
    """Delete a staged (never published) dataset's rows in chunks, then its staging mark."""
    while True:
        with store._tx() as c:
            if c.execute("SELECT 1 FROM datasets WHERE id = ?", (dataset_id,)).fetchone() is not None:
                return  # published after all (a sweep raced a commit): never delete live rows
            gone = c.execute("DELETE FROM dataset_rows WHERE dataset_id = ? AND idx IN (SELECT idx FROM dataset_rows "
                             "WHERE dataset_id = ? LIMIT ?)", (dataset_id, dataset_id, CHUNK_ROWS)).rowcount
            if gone < CHUNK_ROWS:
                c.execute("DELETE FROM uploads WHERE dataset_id = ?", (dataset_id,))
                return


class SqliteUploads(ChunkedCreate):
    """The staged-upload operations of :class:`proxy.store.base.Store` on the SQLite store."""

    def begin_upload(self, name: str, budget_epsilon: float, budget_delta: float, public: bool = False,
                     labels: Sequence[str] | None = None) -> SqliteStagedUpload:
        self.sweep_uploads()
        return SqliteStagedUpload(self, name, budget_epsilon, budget_delta, public, labels)

    def sweep_uploads(self) -> int:
        """Delete the staged rows of dead uploads (owner gone, or stale); returns how many."""
        cutoff = time.time() - STALE_SECONDS
        marks = self._conn().execute("SELECT dataset_id, owner, touched_at FROM uploads").fetchall()  # type: ignore[attr-defined]
        dead = [ds for ds, owner, touched in marks if touched < cutoff or not _alive(owner)]
        for ds in dead:
            delete_staged(self, ds)
        return len(dead)

