"""Warm-up records in the Store (both backends): creation with deduplication, compare-and-set
updates (what makes cancelling a queued warm-up race-free against a worker starting it), listing."""

from __future__ import annotations

import threading

import pytest

from proxy.store import NotFound, open_store


def rec(i: str, state: str = "queued", **kw) -> dict:
    return {"id": i, "state": state, "task": "t", **kw}


def test_create_dedupes_active_only(store):
    first, created = store.create_warmup(rec("w1"), dedupe="k")
    assert created and first["id"] == "w1"
    again, created = store.create_warmup(rec("w2"), dedupe="k")
    assert not created and again["id"] == "w1"
    other, created = store.create_warmup(rec("w3"), dedupe="other")
    assert created and other["id"] == "w3"
    assert store.get_warmup("w2") is None
    # Once the first is finished, the key is free again.
    store.update_warmup("w1", state="done")
    fresh, created = store.create_warmup(rec("w4"), dedupe="k")
    assert created and fresh["id"] == "w4"
    no_key, created = store.create_warmup(rec("w5"))
    assert created
    assert [r["id"] for r in store.list_warmups()] == ["w5", "w4", "w3", "w1"]
    assert [r["id"] for r in store.list_warmups(limit=2)] == ["w5", "w4"]


def test_update_is_compare_and_set(store):
    store.create_warmup(rec("w1"), dedupe="k")
    assert store.update_warmup("w1", expect=("queued",), state="running", tokens_done=0)["state"] == "running"
    # A cancel that expects "queued" now loses: nothing changes.
    assert store.update_warmup("w1", expect=("queued",), state="cancelled") is None
    assert store.get_warmup("w1")["state"] == "running"
    got = store.update_warmup("w1", tokens_done=5)
    assert got["tokens_done"] == 5 and got["state"] == "running" and got["task"] == "t"
    with pytest.raises(NotFound):
        store.update_warmup("nope", state="done")
    assert store.get_warmup("nope") is None


def test_concurrent_creates_make_one_active(store_url):
    stores = [open_store(store_url) for _ in range(4)]
    results: list[bool] = []
    lock = threading.Lock()

    def worker(i, s):
        for n in range(5):
            _, created = s.create_warmup(rec(f"w{i}-{n}"), dedupe="same")
            with lock:
                results.append(created)

    threads = [threading.Thread(target=worker, args=(i, s)) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1 and len(results) == 20
    for s in stores:
        s.close()
