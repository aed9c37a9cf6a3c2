"""The Store contract, run against both backends (SQLite file and a real redis-server)."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from proxy.store import BudgetExceeded, Charge, NotFound, open_store
from proxy.store.base import DatasetMeta, LedgerEntry

ROWS = [("where is the louvre", "location"), ("who wrote hamlet", "human"), ("when did ww2 end", "number")]


def charge(partition: str = "*", sigma: float = 50.0) -> Charge:
    return Charge(partition, {"type": "GaussianDpEvent", "noise_multiplier": sigma})


def count_check(budget_entries: int):
    """A check that allows at most ``budget_entries`` ledger entries and reports their number."""

    def check(meta: DatasetMeta, entries) -> float:
        if len(entries) + 1 > budget_entries:
            raise BudgetExceeded("full", remaining=0.0)
        return float(len(entries) + 1)

    return check


def test_dataset_lifecycle(store):
    meta = store.create_dataset("trec", ROWS, 4.0, 1e-5)
    assert re.fullmatch(r"ds_[0-9a-f]{16}", meta.id)
    assert (meta.name, meta.version, meta.rows) == ("trec", 1, 3)
    assert meta.labels == ["human", "location", "number"]
    assert meta.noisy_counts is None and meta.public is False
    got = store.get_dataset(meta.id)
    assert got == meta
    assert store.load_rows(meta.id) == ROWS
    assert [m.id for m in store.list_datasets()] == [meta.id]

    assert meta.units == 3 and store.get_population("trec").versions == [meta.id]
    assert store.set_noisy_counts(meta.id, {"human": 1.5}) == {"human": 1.5}
    assert store.set_noisy_counts(meta.id, {"human": 9.0}) == {"human": 1.5}  # the first release wins
    store.set_budget("trec", 6.5, 1e-6, lambda pop, entries: None)
    again = store.get_dataset(meta.id)
    assert (again.budget_epsilon, again.budget_delta, again.noisy_counts) == (6.5, 1e-6, {"human": 1.5})

    store.append_ledger(meta.id, [charge()], "admin", "warm", count_check(10))
    store.put_demos("k1", meta.id, "t", {"demos": [1]})
    store.delete_dataset(meta.id)
    with pytest.raises(NotFound):
        store.get_dataset(meta.id)
    with pytest.raises(NotFound):
        store.load_rows(meta.id)
    with pytest.raises(NotFound):
        store.delete_dataset(meta.id)
    assert store.list_datasets() == []
    assert store.get_demos("k1") is None
    assert len(store.ledger("trec")) == 1  # the ledger outlives the data
    assert store.get_population("trec").versions == []
    with pytest.raises(NotFound):  # but nothing more can be charged on a deleted dataset
        store.append_ledger(meta.id, [charge()], "admin", "warm", count_check(10))


#: kind -> (a release, a different release of the same shape, two keys); one kind's keys are
#: never visible as the other's (each has its own table / hash).
KEYED_RELEASES = {
    "width": ({"grid": [8, 10], "bins": [1.5, -0.25, 2.0], "sigma": 20.0}, {"bins": [9.0, 9.0, 9.0], "sigma": 5.0},
              ("local:a", "local:b")),
    "cluster": ({"label": "x", "centroids": [[0.6, 0.8]], "noisy_sizes": [3.5]}, {"noisy_sizes": [9.0]},
                ("k", "k2")),
}


@pytest.mark.parametrize("kind", sorted(KEYED_RELEASES))
def test_keyed_releases_round_trip(store_url, kind):
    """A DP release per (dataset version, key) of each kind (row lengths, clusters): first wins,
    survives a reopen, is kept apart from the other kind, goes with its dataset."""
    release, change, (key, key2) = KEYED_RELEASES[kind]
    other_kind = next(k for k in KEYED_RELEASES if k != kind)
    s = open_store(store_url)
    get, put = getattr(s, f"get_{kind}_release"), getattr(s, f"set_{kind}_release")
    m = s.create_dataset("w", ROWS, 2.0, 1e-6)
    other = s.create_dataset("w", ROWS, 2.0, 1e-6)  # version 2 has its own releases
    assert get(m.id, key) is None
    assert put(m.id, key, release) == release
    assert put(m.id, key, {**release, **change}) == release  # the first stored wins
    assert put(m.id, key2, {**release, **change}) == {**release, **change}
    assert get(other.id, key) is None
    assert getattr(s, f"get_{other_kind}_release")(m.id, key) is None
    s.close()
    s2 = open_store(store_url)
    assert getattr(s2, f"get_{kind}_release")(m.id, key) == release
    s2.delete_dataset(m.id)
    assert getattr(s2, f"get_{kind}_release")(m.id, key) is None
    with pytest.raises(NotFound):  # refused for a deleted dataset version
        getattr(s2, f"set_{kind}_release")(m.id, key, release)
    s2.close()


def test_store_declares_every_dp_release(store):
    """The releases are part of the Store contract (proxy.store.releases), so serving code calls
    them on a ``Store`` without ``type: ignore``, and a backend missing one cannot be instantiated."""
    from proxy.store.base import Store

    releases = {"set_noisy_counts", "get_width_release", "set_width_release", "get_cluster_release",
                "set_cluster_release"}
    assert releases <= Store.__abstractmethods__
    assert isinstance(store, Store) and not releases & type(store).__abstractmethods__
    partial = type("Partial", (Store,), {m: (lambda self, *a: None) for m in Store.__abstractmethods__
                                          if m != "get_cluster_release"})
    with pytest.raises(TypeError, match="get_cluster_release"):
        partial()
    clusters_src = (Path(__file__).resolve().parent.parent / "proxy" / "serving" / "clusters.py").read_text()
    assert "cluster_release" in clusters_src and "type: ignore" not in clusters_src


def test_missing_things(store):
    with pytest.raises(NotFound):
        store.get_dataset("ds_0000")
    with pytest.raises(NotFound):
        store.set_noisy_counts("ds_0000", {})
    with pytest.raises(NotFound):
        store.get_population("x")
    with pytest.raises(NotFound):
        store.set_budget("x", 1.0, 1e-5, lambda pop, entries: None)
    with pytest.raises(NotFound):
        store.reset_ledger("x", "admin", "why")
    assert store.ledger("x") == [] and store.audit() == []
    assert store.get_demos("nope") is None and store.get_task("nope") is None
    assert store.get_job("nope") is None and store.get_blob("nope") is None
    with pytest.raises(NotFound):
        store.update_job("nope", state="x")


def test_versions_per_name(store):
    a1 = store.create_dataset("a", ROWS, 1.0, 1e-5)
    a2 = store.create_dataset("a", ROWS[:1], 1.0, 1e-5)
    b1 = store.create_dataset("b", ROWS, 1.0, 1e-5, public=True)
    assert (a1.version, a2.version, b1.version) == (1, 2, 1)
    assert len({a1.id, a2.id, b1.id}) == 3
    assert store.get_dataset(b1.id).public is True
    store.delete_dataset(a2.id)
    a3 = store.create_dataset("a", ROWS, 1.0, 1e-5)
    assert a3.version == 3  # versions never repeat, even after a deletion
    assert [m.id for m in store.list_datasets()] == [a1.id, b1.id, a3.id]
    assert store.load_rows(a1.id) == ROWS


def test_empty_dataset_and_unicode(store):
    empty = store.create_dataset("empty", [], 1.0, 1e-5)
    assert store.load_rows(empty.id) == [] and empty.labels == []
    rows = [("naïve café — 東京?", "lieu"), ("a,\"quoted\"\nline", "x")]
    m = store.create_dataset("u", rows, 1.0, 1e-5)
    assert store.load_rows(m.id) == rows


def test_ledger_order_and_seq(store):
    m = store.create_dataset("d", ROWS, 4.0, 1e-5)
    seen = []

    def check(meta, entries):
        seen.append((meta.id, [e.seq for e in entries]))
        return 0.25 * (len(entries) + 1)

    first = store.append_ledger(m.id, [charge("human"), charge("*", 30.0)], "alice", "task-a", check)
    second = store.append_ledger(m.id, [charge("number")], "bob", "job-1", check)
    assert [e.seq for e in first] == [1, 2] and [e.seq for e in second] == [3]
    assert seen == [(m.id, []), (m.id, [1, 2])]
    ledger = store.ledger(m.name)
    assert [(e.seq, e.partition, e.actor, e.reason) for e in ledger] == [
        (1, "human", "alice", "task-a"), (2, "*", "alice", "task-a"), (3, "number", "bob", "job-1")]
    assert all(isinstance(e, LedgerEntry) and e.dataset_id == m.id for e in ledger)
    assert [e.epsilon_after for e in ledger] == [0.25, 0.25, 0.75]
    assert ledger[1].event == {"type": "GaussianDpEvent", "noise_multiplier": 30.0}
    assert ledger[0].created_at <= ledger[2].created_at
    assert [e.seq for e in store.ledger("d", after_seq=2)] == [3]
    assert store.ledger("d", after_seq=3) == []
    other = store.create_dataset("other", ROWS, 4.0, 1e-5)
    assert store.ledger("other") == []  # ledgers are per dataset name


def test_append_ledger_all_or_nothing(store):
    m = store.create_dataset("d", ROWS, 4.0, 1e-5)
    store.append_ledger(m.id, [charge()], "a", "r", count_check(2))
    with pytest.raises(BudgetExceeded):  # the check refuses: neither charge is written
        store.append_ledger(m.id, [charge(), charge()], "a", "r", count_check(1))
    assert [e.seq for e in store.ledger(m.name)] == [1]
    # A failure after the check passed (second charge cannot be serialised): nothing is written.
    with pytest.raises(TypeError):
        store.append_ledger(m.id, [charge(), Charge("*", {"type": "x", "bad": object()})], "a", "r",
                            count_check(5))
    assert [e.seq for e in store.ledger(m.name)] == [1]

    def boom(meta, entries):
        raise RuntimeError("check failed")

    with pytest.raises(RuntimeError):
        store.append_ledger(m.id, [charge(), charge()], "a", "r", boom)
    assert len(store.ledger(m.name)) == 1
    # The store is still usable after a failed transaction.
    assert [e.seq for e in store.append_ledger(m.id, [charge()], "a", "r", count_check(5))] == [2]


def test_append_ledger_threads_never_overshoot(store_url):
    """Threads (each with its own connection) racing on one dataset: the check is atomic."""
    stores = [open_store(store_url) for _ in range(4)]
    m = stores[0].create_dataset("d", ROWS, 4.0, 1e-5)
    wins = []
    lock = threading.Lock()

    def worker(s):
        for _ in range(10):
            try:
                s.append_ledger(m.id, [charge()], "t", "r", count_check(7))
                with lock:
                    wins.append(1)
            except BudgetExceeded:
                pass

    threads = [threading.Thread(target=worker, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 7
    assert [e.seq for e in stores[0].ledger(m.name)] == list(range(1, 8))
    for s in stores:
        s.close()


def test_demos_cache(store):
    a = store.create_dataset("a", ROWS, 1.0, 1e-5)
    b = store.create_dataset("b", ROWS, 1.0, 1e-5)
    store.put_demos("k1", a.id, "t1", {"demos": ["x"], "epsilon": 1.0})
    store.put_demos("k2", a.id, "t2", {"demos": ["y"]})
    store.put_demos("k3", b.id, "t1", {"demos": ["z"]})
    assert store.get_demos("k1") == {"demos": ["x"], "epsilon": 1.0}
    store.put_demos("k1", a.id, "t1", {"demos": ["x2"]})  # overwrite
    assert store.get_demos("k1") == {"demos": ["x2"]}
    with pytest.raises(ValueError):
        store.delete_demos()
    assert store.delete_demos(task="t1", dataset_id=b.id) == 1  # filters combine
    assert store.get_demos("k3") is None and store.get_demos("k1") is not None
    assert store.delete_demos(task="t1") == 1
    assert store.delete_demos(key="k2") == 1
    assert store.delete_demos(key="k2") == 0
    store.put_demos("k4", a.id, "t3", {})
    store.put_demos("k5", a.id, "t3", {})
    store.put_demos("k6", b.id, "t3", {})
    assert store.delete_demos(dataset_id=a.id) == 2
    assert store.get_demos("k6") == {}
    store.put_demos("k6", a.id, "t4", {"moved": True})  # re-put under another dataset/task
    assert store.delete_demos(dataset_id=b.id) == 0
    assert store.delete_demos(task="t4") == 1


def test_tasks(store):
    spec = {"model": "trec", "shots": {"location": 2}, "epsilon": 1.0}
    store.put_task("trec", spec)
    store.put_task("other", {"model": "o"})
    assert store.get_task("trec") == spec
    assert list(store.list_tasks()) == ["other", "trec"]
    store.put_task("trec", {**spec, "epsilon": 2.0})
    assert store.get_task("trec")["epsilon"] == 2.0
    assert store.delete_task("trec") is True
    assert store.delete_task("trec") is False
    assert store.list_tasks() == {"other": {"model": "o"}}


def test_client_keys(store):
    rec = {"key_hash": "a" * 64, "tasks": ["t1"], "passthrough": False, "created_at": 1.0}
    assert store.list_client_keys() == {}
    assert store.add_client_key("app2", rec) is True
    assert store.add_client_key("app2", {**rec, "key_hash": "b" * 64}) is False  # never overwritten
    store.add_client_key("app1", {**rec, "key_hash": "c" * 64})
    keys = store.list_client_keys()
    assert list(keys) == ["app1", "app2"] and keys["app2"] == rec
    assert store.delete_client_key("app2") is True
    assert store.delete_client_key("app2") is False
    assert list(store.list_client_keys()) == ["app1"]


def test_jobs(store):
    store.put_job("j1", {"id": "j1", "state": "queued", "progress": 0.0})
    store.put_job("j2", {"id": "j2", "state": "queued"})
    rec = store.update_job("j1", state="running", progress=0.5)
    assert rec == {"id": "j1", "state": "running", "progress": 0.5}
    assert store.get_job("j1") == rec
    assert [j["id"] for j in store.list_jobs()] == ["j1", "j2"]
    store.put_job("j1", {"id": "j1", "state": "done"})  # rewrite keeps its place
    assert [j["id"] for j in store.list_jobs()] == ["j1", "j2"]


def test_update_job_concurrent_merges(store_url):
    """Concurrent update_job calls on different fields all land (atomic read-merge-write)."""
    stores = [open_store(store_url) for _ in range(4)]
    stores[0].put_job("j", {"id": "j"})

    def worker(i, s):
        for n in range(10):
            s.update_job("j", **{f"f{i}_{n}": n})

    threads = [threading.Thread(target=worker, args=(i, s)) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rec = stores[0].get_job("j")
    assert len(rec) == 1 + 40
    for s in stores:
        s.close()


def test_blobs_and_ping(store):
    data = bytes(range(256)) * 10
    store.put_blob("jobs/j1/result.tar", data)
    assert store.get_blob("jobs/j1/result.tar") == data
    store.put_blob("jobs/j1/result.tar", b"")
    assert store.get_blob("jobs/j1/result.tar") == b""
    assert store.ping() is True


def test_reopen_keeps_everything(store_url):
    s = open_store(store_url)
    m = s.create_dataset("d", ROWS, 2.0, 1e-6)
    s.append_ledger(m.id, [charge()], "a", "r", count_check(3))
    s.put_task("t", {"x": 1})
    s.close()
    s2 = open_store(store_url)
    assert s2.get_dataset(m.id) == m
    assert s2.load_rows(m.id) == ROWS
    assert len(s2.ledger(m.name)) == 1 and s2.get_task("t") == {"x": 1}
    s2.close()


def test_open_store_urls(tmp_path, monkeypatch, redis_url):
    from proxy.store import default_store_url
    from proxy.store.redis_store import RedisStore
    from proxy.store.sqlite import SqliteStore

    monkeypatch.delenv("DPICL_STORE_URL", raising=False)
    monkeypatch.setenv("DPICL_DATA_DIR", str(tmp_path / "data"))
    assert default_store_url() == f"sqlite:///{tmp_path / 'data' / 'dpicl.db'}"
    s = open_store()
    assert isinstance(s, SqliteStore) and s.path == tmp_path / "data" / "dpicl.db" and s.path.exists()
    s.close()
    monkeypatch.chdir(tmp_path)
    rel = open_store("sqlite:///rel/x.db")
    assert rel.path.resolve() == (tmp_path / "rel" / "x.db").resolve()
    rel.close()
    for bad in ("postgres://u:secret@h/db", "sqlite:///", "sqlite:///:memory:"):
        with pytest.raises(ValueError) as err:
            open_store(bad)
        assert "secret" not in str(err.value)

    r1 = open_store(redis_url + "?prefix=one:")
    r2 = open_store(redis_url)
    assert isinstance(r1, RedisStore) and (r1.prefix, r2.prefix) == ("one:", "dpicl:")
    r1.put_task("t", {"a": 1})
    assert r2.get_task("t") is None  # prefixes isolate deployments sharing one Redis
    assert all(k.startswith(b"one:") for k in r1.r.keys("*") if k != b"dpicl:schema")  # r2 marks its layout
    monkeypatch.setenv("DPICL_REDIS_PREFIX", "env:")
    assert open_store(redis_url).prefix == "env:"
    for s in (r1, r2):
        s.close()


def test_redis_ping_false_when_down():
    import socket

    from proxy.store.redis_store import RedisStore

    with socket.socket() as sock:  # a port nobody listens on once the socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = RedisStore(f"redis://127.0.0.1:{port}/0", socket_timeout=1.0)
    assert s.ping() is False
    s.close()
