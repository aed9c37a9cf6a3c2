"""Migration of a schema-1 SQLite store (budgets and ledgers per dataset id) to schema 2 (per name).

Schema 1 kept one budget and one ledger per dataset *version*, so a new version or a delete and
re-upload started from zero. Schema 2 keys both by the dataset name. The migration:

1. copies the whole file to ``<file>.schema1-<unix time>.bak`` (SQLite's online backup, so the
   copy is consistent even with other readers) before anything is changed;
2. in one transaction: creates the population of every name with the *smallest* budget epsilon
   and delta among its live versions (the conservative choice when versions disagreed);
3. moves every ledger entry to its version's name, renumbered per name in time order. Entries of
   versions deleted under schema 1 lost their name (schema 1 deleted the metadata), so each such
   id becomes a population of its own, named after the id, with a budget equal to its recorded
   spend (nothing more can be spent on it without an admin raising it);
4. adds the unit column (rows of schema 1 had no units: each row is its own unit).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}


def schema_version(conn: sqlite3.Connection) -> int:
    """0 for an empty file, 1 for the per-dataset layout, 2 for the per-name layout."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "datasets" not in tables:
        return 0
    if "budget_epsilon" in _columns(conn, "datasets"):
        return 1
    return 2


def migrate_if_needed(conn: sqlite3.Connection, path: Path, schema_v2: str) -> Path | None:
    """Migrate a schema-1 file in place (after a backup); returns the backup's path, or None."""
    conn.execute("BEGIN IMMEDIATE")  # one migrator at a time; others see v2 when they get the lock
    try:
        version = schema_version(conn)
    finally:
        conn.execute("ROLLBACK")
    if version != 1:
        return None
    backup = path.with_name(f"{path.name}.schema1-{int(time.time())}.bak")
    target = sqlite3.connect(backup)
    try:
        conn.backup(target)
    finally:
        target.close()
    conn.execute("BEGIN IMMEDIATE")
    try:
        if schema_version(conn) == 1:  # another process may have migrated while we copied
            _migrate(conn, schema_v2)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return backup


def _migrate(c: sqlite3.Connection, schema_v2: str) -> None:
    c.execute("ALTER TABLE datasets RENAME TO datasets_v1")
    c.execute("ALTER TABLE ledger RENAME TO ledger_v1")
    c.execute("DROP INDEX IF EXISTS demos_by_dataset")
    c.execute("DROP INDEX IF EXISTS demos_by_task")
    for stmt in schema_v2.split(";"):
        if stmt.strip() and "dataset_rows" not in stmt:
            c.execute(stmt)
    if "unit" not in _columns(c, "dataset_rows"):
        c.execute("ALTER TABLE dataset_rows ADD COLUMN unit TEXT")
    now = time.time()
    c.execute(
        "INSERT INTO populations (name, last_version, budget_epsilon, budget_delta, created_at) "
        "SELECT n.name, n.last_version, MIN(d.budget_epsilon), MIN(d.budget_delta), MIN(d.created_at) "
        "FROM dataset_names n JOIN datasets_v1 d ON d.name = n.name GROUP BY n.name")
    # Names whose versions were all deleted: their ledgers lost the name (see the docstring).
    c.execute(
        "INSERT INTO populations (name, last_version, budget_epsilon, budget_delta, created_at) "
        "SELECT n.name, n.last_version, 0.0, 1e-5, ? FROM dataset_names n "
        "WHERE n.name NOT IN (SELECT name FROM populations)", (now,))
    c.execute(
        "INSERT INTO datasets (id, name, version, rows, units, labels, created_at, public, noisy_counts) "
        "SELECT id, name, version, rows, rows, labels, created_at, public, noisy_counts FROM datasets_v1")
    c.execute(
        "INSERT INTO populations (name, last_version, budget_epsilon, budget_delta, created_at) "
        "SELECT l.dataset_id, 0, MAX(l.epsilon_after), 1e-5, MIN(l.created_at) FROM ledger_v1 l "
        "WHERE l.dataset_id NOT IN (SELECT id FROM datasets_v1) GROUP BY l.dataset_id")
    c.execute(
        "INSERT INTO ledger (name, seq, dataset_id, partition, event, epsilon_after, actor, reason, created_at, "
        "kind, ref) "
        "SELECT COALESCE(d.name, l.dataset_id), "
        "ROW_NUMBER() OVER (PARTITION BY COALESCE(d.name, l.dataset_id) ORDER BY l.created_at, l.dataset_id, l.seq), "
        "l.dataset_id, l.partition, l.event, l.epsilon_after, l.actor, l.reason, l.created_at, 'charge', '' "
        "FROM ledger_v1 l LEFT JOIN datasets_v1 d ON d.id = l.dataset_id")
    c.execute("DROP TABLE ledger_v1")
    c.execute("DROP TABLE datasets_v1")
    c.execute("DROP TABLE dataset_names")


#: The rows table since issue 20: a rowid table, so row text never sits in a b-tree key.
ROWS_TABLE = """
CREATE TABLE IF NOT EXISTS dataset_rows (
    dataset_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    text TEXT NOT NULL,
    label TEXT NOT NULL,
    unit TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS dataset_rows_by_id ON dataset_rows (dataset_id, idx)
"""


def rebuild_rows_table(conn: sqlite3.Connection) -> bool:
    """Convert a ``WITHOUT ROWID`` rows table (before issue 20) to :data:`ROWS_TABLE`, in one
    transaction; returns whether it did.

    Why: a ``WITHOUT ROWID`` table keeps whole rows in its key b-tree, so every insert that
    compares its key against a stored multi-megabyte row read that row in full (one legal 9 MB
    row made later uploads insert at milliseconds per row while holding the write lock). In a
    rowid table the key (dataset id, position) is in a small index and the text is read only
    by ``load_rows``.
    """
    def old_layout() -> bool:
        row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'dataset_rows'").fetchone()
        return row is not None and "WITHOUT ROWID" in row[0].upper()

    if not old_layout():
        return False
    conn.execute("BEGIN IMMEDIATE")
    try:
        if old_layout():  # another process may have converted it while we waited
            conn.execute("ALTER TABLE dataset_rows RENAME TO dataset_rows_old")
            for stmt in ROWS_TABLE.split(";"):
                conn.execute(stmt)
            conn.execute("INSERT INTO dataset_rows (dataset_id, idx, text, label, unit) "
                         "SELECT dataset_id, idx, text, label, unit FROM dataset_rows_old ORDER BY dataset_id, idx")
            conn.execute("DROP TABLE dataset_rows_old")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return True
