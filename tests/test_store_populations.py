"""Store schema 2: one budget and ledger per dataset name, resets, the audit log, conditional
writes (on both backends), the schema-1 SQLite migration and the refusal of a schema-1 Redis."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest
import redis

from proxy.store import BudgetExceeded, Charge, NotFound, SchemaError, open_store
from proxy.store.redis_store import RedisStore

ROWS = [("where is the louvre", "location"), ("who wrote hamlet", "human"), ("when did ww2 end", "number")]


def charge(partition: str = "*") -> Charge:
    return Charge(partition, {"type": "GaussianDpEvent", "noise_multiplier": 50.0})


def ok(meta, entries) -> float:
    return float(len(entries) + 1)


def test_versions_share_one_ledger_and_budget(store):
    v1 = store.create_dataset("crm", ROWS, 3.0, 1e-6, labels=["human", "location", "number", "entity"])
    assert v1.labels == ["human", "location", "number", "entity"]  # the declared domain, in order
    store.append_ledger(v1.id, [charge()], "admin", "warm", ok, kind="warmup", ref="wu_1")
    v2 = store.create_dataset("crm", ROWS[:2], 99.0, 1e-3)  # budget arguments of a known name are ignored
    assert (v2.version, v2.budget_epsilon, v2.budget_delta) == (2, 3.0, 1e-6)
    store.append_ledger(v2.id, [charge("human")], "admin", "job", ok, kind="job", ref="job_1")
    ledger = store.ledger("crm")
    assert [(e.seq, e.dataset_id, e.kind, e.ref, e.name) for e in ledger] == [
        (1, v1.id, "warmup", "wu_1", "crm"), (2, v2.id, "job", "job_1", "crm")]
    store.delete_dataset(v1.id)
    store.delete_dataset(v2.id)
    pop = store.get_population("crm")
    assert pop.versions == [] and pop.last_version == 2 and pop.budget_epsilon == 3.0
    v3 = store.create_dataset("crm", ROWS, 50.0, 1e-5)  # a re-upload continues the ledger and budget
    assert (v3.version, v3.budget_epsilon) == (3, 3.0)
    assert len(store.ledger("crm")) == 2
    assert [p.name for p in store.list_populations()] == ["crm"]


def test_units_are_counted_and_loaded(store):
    rows = [("a", "x", "alice"), ("b", "x", "alice"), ("c", "y", None), ("d", "y", "bob")]
    m = store.create_dataset("u", rows, 1.0, 1e-5)
    assert (m.rows, m.units) == (4, 3)
    assert store.load_rows(m.id, units=True) == rows
    assert store.load_rows(m.id) == [(t, lab) for t, lab, _ in rows]


def test_reset_appends_a_marker(store):
    m = store.create_dataset("d", ROWS, 4.0, 1e-5)
    store.append_ledger(m.id, [charge()], "admin", "warm", ok)
    marker = store.reset_ledger("d", "admin", "new collection period")
    assert (marker.seq, marker.kind, marker.reason, marker.event) == (2, "reset", "new collection period",
                                                                     {"type": "NoOpDpEvent"})
    assert [e.kind for e in store.ledger("d")] == ["charge", "reset"]  # nothing is removed


def test_audit_log_append_only_newest_first(store):
    for i in range(5):
        store.append_audit("admin", "dataset.upload", f"d{i}", {"rows": i})
    got = store.audit(limit=2)
    assert [(a.seq, a.target, a.details) for a in got] == [(5, "d4", {"rows": 4}), (4, "d3", {"rows": 3})]
    assert [a.seq for a in store.audit(limit=10, before=3)] == [2, 1]
    assert store.audit(limit=10, before=1) == []


def test_budget_change_is_compare_and_set(store_url):
    """The review's interleaving: an admin lowers the budget while a warm-up is between reading the
    dataset and writing its results back. The warm-up's writes (noisy counts, charges) can no
    longer carry the old budget back, and a charge that does not fit the new budget is refused."""
    s1, s2 = open_store(store_url), open_store(store_url)
    try:
        m = s1.create_dataset("race", ROWS, 4.0, 1e-5)
        stale = s2.get_dataset(m.id)  # the warm-up read the metadata (budget 4.0)
        s1.set_budget("race", 0.5, 1e-5, lambda pop, entries: None)  # the admin lowers it
        s2.set_noisy_counts(stale.id, {"human": 3.0})  # the warm-up writes its release back

        def check(meta, entries):
            if meta.budget_epsilon < 1.0:
                raise BudgetExceeded("over", remaining=meta.budget_epsilon)
            return 1.0

        with pytest.raises(BudgetExceeded):
            s2.append_ledger(stale.id, [charge()], "warm", "warm-up", check)
        assert s1.get_dataset(m.id).budget_epsilon == 0.5
        assert s1.get_population("race").budget_epsilon == 0.5
        assert s1.ledger("race") == []
    finally:
        s1.close()
        s2.close()


def test_budget_check_sees_concurrent_charges(store_url):
    """set_budget's check runs on the ledger inside the atomic section: a charge racing with it
    is either seen by the check or made under the new budget, never neither."""
    stores = [open_store(store_url) for _ in range(3)]
    try:
        m = stores[0].create_dataset("cas", ROWS, 100.0, 1e-5)
        refused = []

        def set_low(s):
            def check(pop, entries):
                if len(entries) > 0:
                    raise ValueError("already spent")
            try:
                s.set_budget("cas", 1.0, 1e-5, check)
            except ValueError:
                refused.append(True)

        def spend(s):
            def check(meta, entries):
                if meta.budget_epsilon < 50:
                    raise BudgetExceeded("low", remaining=0.0)
                return 1.0
            try:
                s.append_ledger(m.id, [charge()], "c", "r", check)
            except BudgetExceeded:
                pass

        threads = [threading.Thread(target=set_low, args=(stores[0],)),
                   threading.Thread(target=spend, args=(stores[1],))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ledger, budget = stores[2].ledger("cas"), stores[2].get_population("cas").budget_epsilon
        # Either the charge went first (then the lowering was refused) or the lowering did (then
        # the charge was refused): never a charge under a budget that forbids it.
        assert (len(ledger), budget, bool(refused)) in ((1, 100.0, True), (0, 1.0, False))
    finally:
        for s in stores:
            s.close()


def test_first_noisy_count_release_wins_across_stores(store_url):
    s1, s2 = open_store(store_url), open_store(store_url)
    try:
        m = s1.create_dataset("nc", ROWS, 4.0, 1e-5)
        first = s1.set_noisy_counts(m.id, {"human": 1.0})
        second = s2.set_noisy_counts(m.id, {"human": 2.0})
        assert first == second == {"human": 1.0}
    finally:
        s1.close()
        s2.close()


def _schema1_file(path) -> None:
    c = sqlite3.connect(path)
    c.executescript("""
        CREATE TABLE dataset_names (name TEXT PRIMARY KEY, last_version INTEGER NOT NULL);
        CREATE TABLE datasets (id TEXT PRIMARY KEY, name TEXT NOT NULL, version INTEGER NOT NULL,
            rows INTEGER NOT NULL, labels TEXT NOT NULL, budget_epsilon REAL NOT NULL,
            budget_delta REAL NOT NULL, created_at REAL NOT NULL, public INTEGER NOT NULL DEFAULT 0,
            noisy_counts TEXT);
        CREATE TABLE dataset_rows (dataset_id TEXT NOT NULL, idx INTEGER NOT NULL, text TEXT NOT NULL,
            label TEXT NOT NULL, PRIMARY KEY (dataset_id, idx)) WITHOUT ROWID;
        CREATE TABLE ledger (dataset_id TEXT NOT NULL, seq INTEGER NOT NULL, partition TEXT NOT NULL,
            event TEXT NOT NULL, epsilon_after REAL NOT NULL, actor TEXT NOT NULL, reason TEXT NOT NULL,
            created_at REAL NOT NULL, PRIMARY KEY (dataset_id, seq)) WITHOUT ROWID;
        CREATE TABLE demos (key TEXT PRIMARY KEY, dataset_id TEXT NOT NULL, task TEXT NOT NULL,
            payload TEXT NOT NULL, created_at REAL NOT NULL);
        CREATE INDEX demos_by_dataset ON demos (dataset_id);
        CREATE INDEX demos_by_task ON demos (task);
        CREATE TABLE tasks (name TEXT PRIMARY KEY, spec TEXT NOT NULL);
        CREATE TABLE jobs (id TEXT PRIMARY KEY, record TEXT NOT NULL, created_at REAL NOT NULL);
        CREATE TABLE blobs (key TEXT PRIMARY KEY, data BLOB NOT NULL);
        INSERT INTO dataset_names VALUES ('crm', 2), ('gone', 1);
        INSERT INTO datasets VALUES ('ds_a', 'crm', 1, 2, '["x", "y"]', 4.0, 1e-5, 1.0, 0, NULL);
        INSERT INTO datasets VALUES ('ds_b', 'crm', 2, 1, '["x"]', 2.0, 1e-6, 2.0, 0, '{"x": 0.5}');
        INSERT INTO dataset_rows VALUES ('ds_a', 0, 'one', 'x'), ('ds_a', 1, 'two', 'y'), ('ds_b', 0, 'three', 'x');
    """)
    ev = json.dumps({"type": "GaussianDpEvent", "noise_multiplier": 20.0})
    c.executemany("INSERT INTO ledger VALUES (?, ?, '*', ?, ?, 'admin', 'r', ?)", [
        ("ds_a", 1, ev, 0.1, 10.0), ("ds_b", 1, ev, 0.1, 11.0), ("ds_a", 2, ev, 0.2, 12.0), ("ds_gone", 1, ev, 0.3, 5.0)])
    c.commit()
    c.close()


def test_sqlite_schema1_is_migrated_after_a_backup(tmp_path):
    path = tmp_path / "old.db"
    _schema1_file(path)
    store = open_store(f"sqlite:///{path}")
    try:
        backups = list(tmp_path.glob("old.db.schema1-*.bak"))
        assert len(backups) == 1
        old = sqlite3.connect(backups[0])
        assert old.execute("SELECT COUNT(*) FROM ledger").fetchone() == (4,)  # the untouched copy
        old.close()
        crm = store.get_population("crm")
        # The most conservative budget of the versions; both versions' charges in one ledger.
        assert (crm.budget_epsilon, crm.budget_delta, crm.versions) == (2.0, 1e-6, ["ds_a", "ds_b"])
        assert [(e.seq, e.dataset_id) for e in store.ledger("crm")] == [(1, "ds_a"), (2, "ds_b"), (3, "ds_a")]
        # A deleted version's ledger lost its name in schema 1: kept under its id, budget = its spend.
        assert store.get_population("ds_gone").budget_epsilon == 0.3 and len(store.ledger("ds_gone")) == 1
        assert store.get_dataset("ds_b").noisy_counts == {"x": 0.5}
        assert store.load_rows("ds_a", units=True) == [("one", "x", None), ("two", "y", None)]
        assert store.get_dataset("ds_a").units == 2
        nxt = store.create_dataset("crm", [("four", "x")], 9.0, 1e-5)
        assert nxt.version == 3 and nxt.budget_epsilon == 2.0
    finally:
        store.close()
    again = open_store(f"sqlite:///{path}")  # a second open neither migrates nor backs up again
    assert len(list(tmp_path.glob("old.db.schema1-*.bak"))) == 1 and len(again.ledger("crm")) == 3
    again.close()


def test_redis_refuses_a_schema1_layout(redis_url):
    r = redis.Redis.from_url(redis_url)
    prefix = "old1:"
    r.hset(prefix + "ds:versions", "crm", 1)
    r.sadd(prefix + "ds:ids", "ds_a")
    try:
        with pytest.raises(SchemaError, match="schema-1 layout"):
            RedisStore(redis_url, prefix=prefix)
    finally:
        r.delete(prefix + "ds:versions", prefix + "ds:ids")
    fresh = RedisStore(redis_url, prefix="fresh2:")
    assert r.get("fresh2:schema") == b"2"
    fresh.close()
    r.delete("fresh2:schema")
    r.close()


def test_missing_population(store):
    with pytest.raises(NotFound):
        store.get_population("nobody")


def test_serve_refuses_a_schema1_redis_in_one_line(redis_url, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    r = redis.Redis.from_url(redis_url)
    r.hset("dpicl:ds:versions", "crm", 1)
    try:
        root = Path(__file__).resolve().parents[1]
        env = {k: v for k, v in os.environ.items() if k not in ("DPICL_CONFIG", "APP1_KEY")}
        env.update(DPICL_ADMIN_KEY="a", DPICL_STORE_URL=redis_url, DPICL_DATA_DIR=str(tmp_path), PYTHONPATH=str(root))
        proc = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "--port", "1"], env=env,
                              capture_output=True, text=True, timeout=120, cwd=str(root))
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "schema-1 layout" in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        r.delete("dpicl:ds:versions")
        r.close()
