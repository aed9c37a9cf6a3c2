"""Staged uploads (issue 20 §1): an upload writes its rows in short chunks that leave the store's
write lock free in between, publishes them in one small step, and leaves nothing behind when it
fails, is abandoned or its process dies; a store that stays locked is a 503 with Retry-After."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import httpx
import pytest
import redis

from proxy.api.errors import store_busy_error
from proxy.store import NotFound, StoreBusy, busy_reason, open_store
from proxy.store.sqlite import SqliteStore
from proxy.store.uploads import CHUNK_BYTES, CHUNK_ROWS, row_chunks, write_all
from tests.test_app_support import LiveServer, admin_headers, jsonl_bytes, make_config, upload

ROWS = [(f"private row {i}", "A" if i % 2 else "B") for i in range(2 * CHUNK_ROWS + 500)]
FAKE_UPSTREAM = "http://127.0.0.1:9"  # never called: these tests use admin endpoints only


def _other(store, store_url: str):
    """A second client of the same backend (its own connection), impatient for the lock."""
    if isinstance(store, SqliteStore):
        return SqliteStore(store.path, timeout=0.05)
    return open_store(store_url)


def _staged_left(store, dataset_id: str) -> int:
    """Rows and staging marks still stored for ``dataset_id`` (0 when nothing is left)."""
    if isinstance(store, SqliteStore):
        c = sqlite3.connect(store.path)
        try:
            rows = c.execute("SELECT COUNT(*) FROM dataset_rows WHERE dataset_id = ?", (dataset_id,)).fetchone()[0]
            marks = c.execute("SELECT COUNT(*) FROM uploads WHERE dataset_id = ?", (dataset_id,)).fetchone()[0]
        finally:
            c.close()
        return rows + marks
    r = store.r
    return (r.llen(store._k("rows", dataset_id)) + r.exists(store._k("upload", dataset_id))
            + r.sismember(store._k("uploads"), dataset_id))


def _check(pop, ledger) -> None:
    return None


def test_row_chunks_bound_rows_and_bytes():
    rows = [(f"r{i}", "A", None) for i in range(2500)]
    assert [len(c) for c in row_chunks(rows)] == [CHUNK_ROWS, CHUNK_ROWS, 500]
    big = ("x" * (CHUNK_BYTES + 1), "A", None)
    # A row larger than the byte bound is a chunk of its own; its neighbours are not added to it.
    assert [len(c) for c in row_chunks([("a", "A", None), big, ("b", "A", None)])] == [1, 1, 1]


def test_upload_leaves_the_lock_free_between_chunks(store, store_url):
    """Between two chunks another connection changes a budget and appends a ledger entry without
    waiting (SQLite: busy timeout 50 ms), and the half-written version is invisible to it."""
    first = store.create_dataset("other", [("a", "A"), ("b", "B")], 4.0, 1e-5, labels=["A", "B"])
    other = _other(store, store_url)
    seen: list[int] = []

    def between_chunks(staged_rows: int) -> None:
        seen.append(staged_rows)
        other.set_budget("other", 4.0 + len(seen), 1e-5, _check)
        other.append_audit("test", "probe", "other", {})
        assert all(m.name != "big" for m in other.list_datasets())
        with pytest.raises(NotFound):
            other.load_rows(up.dataset_id)

    up = store.begin_upload("big", 2.0, 1e-5, labels=["A", "B"])
    up.on_chunk = between_chunks
    meta = write_all(up, ROWS)
    other.close()
    assert seen == [CHUNK_ROWS, 2 * CHUNK_ROWS, len(ROWS)]  # three chunks, three free windows
    assert store.get_population("other").budget_epsilon == 4.0 + len(seen)
    assert (meta.name, meta.version, meta.rows, meta.units, meta.labels) == ("big", 1, len(ROWS), len(ROWS), ["A", "B"])
    assert store.load_rows(meta.id) == ROWS
    assert _staged_left(store, meta.id) == len(ROWS)  # the rows, and no staging mark
    assert store.get_dataset(first.id).rows == 2


def test_failed_upload_leaves_nothing(store):
    """An error after some chunks were written (here: raised between chunks) removes the staged
    rows and the mark; no version appears and the version number is not used up."""
    up = store.begin_upload("gone", 2.0, 1e-5, labels=["A", "B"])

    def fail(staged_rows: int) -> None:
        if staged_rows > CHUNK_ROWS:
            raise RuntimeError("disk full")

    up.on_chunk = fail
    with pytest.raises(RuntimeError):
        write_all(up, ROWS)
    assert _staged_left(store, up.dataset_id) == 0
    assert store.list_datasets() == []
    with pytest.raises(NotFound):
        store.load_rows(up.dataset_id)
    assert store.create_dataset("gone", ROWS[:3], 2.0, 1e-5).version == 1


def test_rows_of_a_dead_upload_are_swept(store):
    """A process that died mid-upload leaves a staging mark; the next upload sweeps its rows, and
    the dead upload can no longer be published."""
    up = store.begin_upload("dead", 2.0, 1e-5, labels=["A", "B"])
    up.add([("r1", "A"), ("r2", "B")])
    if isinstance(store, SqliteStore):  # owned by a process that no longer exists
        c = sqlite3.connect(store.path)
        c.execute("UPDATE uploads SET owner = '999999999:1' WHERE dataset_id = ?", (up.dataset_id,))
        c.commit()
        c.close()
    else:  # the mark expired
        store.r.delete(store._k("upload", up.dataset_id))
    assert _staged_left(store, up.dataset_id) > 0
    store.create_dataset("next", [("x", "A")], 2.0, 1e-5)
    assert _staged_left(store, up.dataset_id) == 0
    with pytest.raises(Exception, match="abandoned"):
        up.commit()
    assert [m.name for m in store.list_datasets()] == ["next"]


def test_sqlite_open_sweeps_a_dead_upload(tmp_path):
    store = SqliteStore(tmp_path / "s.db")
    up = store.begin_upload("dead", 2.0, 1e-5)
    up.add([("r1", "A")])
    store._conn().execute("UPDATE uploads SET owner = '999999999:1'")
    store.close()
    reopened = SqliteStore(tmp_path / "s.db")
    assert _staged_left(reopened, up.dataset_id) == 0
    reopened.close()


def _rows_table_sql(path: Path) -> str:
    c = sqlite3.connect(path)
    try:
        return c.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'dataset_rows'").fetchone()[0]
    finally:
        c.close()


def test_sqlite_rows_never_sit_in_a_btree_key(tmp_path):
    """A WITHOUT ROWID rows table keeps each row's text in its key b-tree: after one 9 MB row was
    stored, inserts whose key search passed that row read all 9 MB per comparison (the issue's
    milliseconds per row under the write lock). Fresh files use a rowid table; an old file is
    rebuilt on open with every row kept."""
    path = tmp_path / "s.db"
    SqliteStore(path).close()
    assert "WITHOUT ROWID" not in _rows_table_sql(path).upper()
    old = tmp_path / "old.db"
    store = SqliteStore(old)
    meta = store.create_dataset("d", [("x" * 100_000, "A", "u1"), ("b", "B")], 2.0, 1e-5)
    store.close()
    c = sqlite3.connect(old, isolation_level=None)
    c.executescript("""
        BEGIN;
        ALTER TABLE dataset_rows RENAME TO r;
        DROP INDEX dataset_rows_by_id;
        CREATE TABLE dataset_rows (dataset_id TEXT NOT NULL, idx INTEGER NOT NULL, text TEXT NOT NULL,
            label TEXT NOT NULL, unit TEXT, PRIMARY KEY (dataset_id, idx)) WITHOUT ROWID;
        INSERT INTO dataset_rows SELECT dataset_id, idx, text, label, unit FROM r;
        DROP TABLE r;
        COMMIT;""")
    c.close()
    assert "WITHOUT ROWID" in _rows_table_sql(old).upper()
    store = SqliteStore(old)
    assert "WITHOUT ROWID" not in _rows_table_sql(old).upper()
    assert store.load_rows(meta.id, units=True) == [("x" * 100_000, "A", "u1"), ("b", "B", None)]
    store.close()


def test_sqlite_lock_timeout_is_store_busy(tmp_path):
    store = SqliteStore(tmp_path / "s.db", timeout=0.05)
    store.create_dataset("d", [("a", "A")], 2.0, 1e-5)
    holder = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreBusy, match="locked"):
            store.set_budget("d", 3.0, 1e-5, _check)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert store.set_budget("d", 3.0, 1e-5, _check).budget_epsilon == 3.0
    store.close()


def test_backend_timeouts_map_to_503_with_retry_after():
    for exc in (StoreBusy("the SQLite store stayed locked for 60 s"), sqlite3.OperationalError("database is locked"),
                redis.exceptions.TimeoutError("Timeout reading from socket"), redis.exceptions.ConnectionError("x")):
        err = store_busy_error(exc)
        assert err is not None and err.status == 503 and err.code == "store_busy"
        assert err.headers == {"Retry-After": "2"} and "\n" not in err.message
    assert busy_reason(sqlite3.OperationalError("no such table: x")) is None
    assert store_busy_error(RuntimeError("boom")) is None


@pytest.fixture
def slow_store(tmp_path, monkeypatch):
    """The app's SQLite store with a 200 ms busy timeout (the default is 60 s)."""
    path = tmp_path / "s.db"
    monkeypatch.setattr("proxy.app.open_store", lambda url: SqliteStore(path, timeout=0.2))
    return path


def test_locked_store_answers_503_with_retry_after(slow_store):
    from proxy.app import create_app

    app = create_app(make_config(f"sqlite:///{slow_store}", FAKE_UPSTREAM, None))
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        assert upload(http, "crm", jsonl_bytes([{"text": "a", "label": "A"}])).status_code == 201
        holder = sqlite3.connect(slow_store, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        try:
            resp = http.put("/admin/budget/crm", json={"epsilon": 5.0}, headers=admin_headers())
            assert resp.status_code == 503
            assert resp.headers["retry-after"] == "2"
            err = resp.json()["error"]
            assert err["code"] == "store_busy" and "\n" not in err["message"] and "locked" in err["message"]
            resp = upload(http, "crm2", jsonl_bytes([{"text": "b", "label": "A"}]))
            assert resp.status_code == 503 and resp.headers["retry-after"] == "2"
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert http.put("/admin/budget/crm", json={"epsilon": 5.0}, headers=admin_headers()).status_code == 200
        assert [d["name"] for d in http.get("/admin/datasets", headers=admin_headers()).json()["data"]] == ["crm"]


def test_shutdown_abandons_an_upload_and_keeps_what_was_committed(tmp_path, monkeypatch):
    """The server is told to exit (what SIGTERM does) while an upload is writing chunks: with a
    grace period (``dpicl serve`` passes server.shutdown_grace_seconds) the request is cancelled
    between chunks, the server stops, and neither the version nor an audit record appears."""
    import uvicorn

    from proxy.app import create_app
    from tests.test_app_support import free_port

    path = tmp_path / "s.db"
    app = create_app(make_config(f"sqlite:///{path}", FAKE_UPSTREAM, None))
    staged = threading.Event()
    stop = threading.Event()

    def slow_begin(real):
        def begin(*args, **kwargs):
            up = real(*args, **kwargs)

            def hook(rows: int) -> None:
                staged.set()
                stop.wait(0.5)  # a slow disk: each chunk takes a while

            up.on_chunk = hook
            return up
        return begin

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                                           lifespan="on", timeout_graceful_shutdown=0.5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        threading.Event().wait(0.02)
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=60) as http:
        assert upload(http, "kept", jsonl_bytes([{"text": "a", "label": "A"}])).status_code == 201
    store = app.state.store
    monkeypatch.setattr(store, "begin_upload", slow_begin(store.begin_upload))
    rows = [{"text": f"row {i}", "label": "A"} for i in range(20 * CHUNK_ROWS)]
    outcome: list[object] = []

    def post() -> None:
        try:
            with httpx.Client(base_url=base, timeout=60) as http:
                outcome.append(upload(http, "big", jsonl_bytes(rows)).status_code)
        except httpx.HTTPError as exc:
            outcome.append(type(exc).__name__)

    client = threading.Thread(target=post)
    client.start()
    assert staged.wait(60)
    server.should_exit = True  # uvicorn's SIGTERM handler does exactly this
    thread.join(60)
    stop.set()
    client.join(60)
    assert not thread.is_alive()
    assert outcome and outcome[0] != 201
    check = SqliteStore(path)
    assert [m.name for m in check.list_datasets()] == ["kept"]
    assert check.load_rows(check.list_datasets()[0].id) == [("a", "A")]
    assert [a.details.get("rows") for a in check.audit() if a.action == "dataset.upload"] == [1]
    c = sqlite3.connect(path)
    assert c.execute("SELECT COUNT(*) FROM dataset_rows").fetchone()[0] == 1
    assert c.execute("SELECT COUNT(*) FROM uploads").fetchone()[0] == 0
    c.close()
    check.close()


def test_serve_passes_the_shutdown_grace_to_uvicorn(tmp_path, monkeypatch):
    import uvicorn
    from typer.testing import CliRunner

    from proxy.cli import app as cli

    seen: dict[str, object] = {}
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: seen.update(kw))
    monkeypatch.setattr("proxy.app.create_app", lambda *a, **kw: object())
    cfg = tmp_path / "c.yaml"
    monkeypatch.setenv("DPICL_CONFIG", "")  # serve sets it; restored after the test
    cfg.write_text(json.dumps({"store": {"url": f"sqlite:///{tmp_path}/s.db"},
                               "server": {"shutdown_grace_seconds": 3}}))
    result = CliRunner().invoke(cli, ["serve", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert seen["timeout_graceful_shutdown"] == 3.0


def test_docs_describe_staged_uploads():
    text = (Path(__file__).resolve().parents[1] / "docs" / "stores.md").read_text()
    assert "staged" in text.lower() and "Retry-After" in text
