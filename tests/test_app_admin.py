"""Admin API: datasets, budgets, tasks and demonstration sets, on SQLite and on a real Redis."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import httpx
import pytest

from proxy.app import create_app
from tests.test_app_support import (  # noqa: F401 - fixtures
    CANARY, LABELS, LiveServer, admin_headers, assert_openai_error, csv_bytes, dataset_rows, fake_upstream,
    jsonl_bytes, make_config, task_spec, tiny_model_dir, upload,
)

FAST = {"mode": "fixed", "num_subsets": 2, "shots_per_subset": 1, "max_tokens": 3, "top_k": 8}


@contextmanager
def _serve(store_url: str, fake_base_url: str, model_dir: str):
    cfg = make_config(store_url, fake_base_url, model_dir, client_tasks=["*"])
    app = create_app(cfg)
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=120, headers=admin_headers()) as http:
        yield app, http


@pytest.fixture
def server(store_url, fake_upstream, tiny_model_dir):
    """A live server on each store backend (``store_url`` is parametrised by tests/conftest.py)."""
    with _serve(store_url, fake_upstream.base_url, tiny_model_dir) as pair:
        yield pair


@pytest.fixture
def sqlite_server(tmp_path, fake_upstream, tiny_model_dir):
    """SQLite only, for the slower generation tests whose store-specific part is covered above."""
    with _serve(f"sqlite:///{tmp_path}/s.db", fake_upstream.base_url, tiny_model_dir) as pair:
        yield pair


def _count_row_reads(app) -> list[int]:
    """Wrap the live store's load_rows so a test can see whether private rows were read."""
    store = app.state.store
    calls = [0]
    original = store.load_rows

    def counting(dataset_id, **kwargs):
        calls[0] += 1
        return original(dataset_id, **kwargs)

    store.load_rows = counting
    return calls


def _no_canary(resp: httpx.Response) -> None:
    assert CANARY not in resp.text


def test_dataset_upload_list_delete(server):
    app, http = server
    r = upload(http, "qa", jsonl_bytes(dataset_rows(20)), epsilon=3.5, delta=1e-6)
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["rows"] == 60 and sorted(ds["labels"]) == sorted(LABELS)
    assert ds["budget_epsilon"] == 3.5 and ds["budget_delta"] == 1e-6 and ds["public"] is False
    _no_canary(r)
    r2 = upload(http, "qa-csv", csv_bytes(dataset_rows(5)), filename="rows.csv", public="true")
    assert r2.status_code == 201, r2.text
    assert r2.json()["rows"] == 15 and r2.json()["public"] is True
    assert r2.json()["budget_epsilon"] == 4.0  # documented default
    listing = http.get("/admin/datasets")
    assert {d["id"] for d in listing.json()["data"]} == {ds["id"], r2.json()["id"]}
    _no_canary(listing)
    _no_canary(http.get(f"/admin/datasets/{ds['id']}"))
    # A new upload under the same name is a new version with a new id.
    r3 = upload(http, "qa", jsonl_bytes(dataset_rows(20)))
    assert r3.json()["version"] == 2 and r3.json()["id"] != ds["id"]
    d = http.delete(f"/admin/datasets/{ds['id']}")
    assert d.status_code == 200 and d.json()["deleted"] is True
    assert ds["id"] not in {x["id"] for x in http.get("/admin/datasets").json()["data"]}
    assert_openai_error(http.delete(f"/admin/datasets/{ds['id']}"), 404)
    assert_openai_error(http.get(f"/admin/datasets/{ds['id']}/budget"), 404)  # deleted, never charged


def test_upload_drops_exact_repeats_unless_told_not_to(server):
    app, http = server
    rows = dataset_rows(10)
    # Three repeats: one verbatim, one differing only in whitespace, one twice more.
    spaced = {**rows[1], "text": "  " + rows[1]["text"].replace(" ", "   ")}
    repeated = rows + [rows[0], spaced, rows[2], rows[2]]
    # The same text under another label is a different record and stays.
    relabelled = {**rows[3], "label": next(lab for lab in LABELS if lab != rows[3]["label"])}
    r = upload(http, "dups", jsonl_bytes(repeated + [relabelled]))
    assert r.status_code == 201, r.text
    assert r.json()["rows"] == 31 and r.json()["duplicates_removed"] == 4
    _no_canary(r)
    kept = upload(http, "dups-kept", jsonl_bytes(repeated), deduplicate="false")
    assert kept.json()["rows"] == 34 and kept.json()["duplicates_removed"] == 0
    # Stored rows are what the response says.
    assert len(app.state.store.load_rows(r.json()["id"])) == 31
    # A misspelt switch is refused, not read as either value; nothing is stored.
    before = len(app.state.store.list_datasets())
    typo = upload(http, "dups-typo", jsonl_bytes(repeated), deduplicate="fasle")
    assert typo.status_code == 400 and typo.json()["error"]["param"] == "deduplicate"
    assert len(app.state.store.list_datasets()) == before


def test_budget_endpoints(server):
    app, http = server
    ds = upload(http, "b", jsonl_bytes(dataset_rows(100)), epsilon=6).json()
    one = http.get(f"/admin/datasets/{ds['id']}/budget").json()
    assert one["budget_epsilon"] == 6 and one["spent_epsilon"] == 0 and one["remaining_epsilon"] == 6
    assert one["entries"] == []
    allb = http.get("/admin/budget").json()["data"]
    assert [(b["name"], b["versions"]) for b in allb] == [("b", [ds["id"]])]
    up = http.put(f"/admin/datasets/{ds['id']}/budget", json={"epsilon": 8, "delta": 1e-6})
    assert up.status_code == 200, up.text
    assert up.json()["budget_epsilon"] == 8 and up.json()["budget_delta"] == 1e-6
    # Spend something, then lowering below the spend is refused.
    http.post("/admin/tasks", json=task_spec("t", "b", generation={**FAST, "sigma": 1.5}))
    w = http.post("/admin/tasks/t/demos", json={"dry_run": False, "wait": True})
    assert w.status_code == 200 and w.json()["state"] == "done", w.text
    spent = http.get(f"/admin/datasets/{ds['id']}/budget").json()
    assert spent["spent_epsilon"] > 0.5
    assert {e["partition"] for e in spent["entries"]} == {"*", *LABELS}
    assert all(e["actor"] == "admin" for e in spent["entries"])
    err = assert_openai_error(http.put(f"/admin/datasets/{ds['id']}/budget",
                                       json={"epsilon": spent["spent_epsilon"] / 2}), 400)
    assert "already spent" in err["message"]
    for bad in ({"epsilon": -1}, {"epsilon": 0}, {"epsilon": "x"}, {"epsilon": 5, "delta": 2}, {}, {"epsilon": 5, "x": 1}):
        assert_openai_error(http.put(f"/admin/datasets/{ds['id']}/budget", json=bad), 400)
    assert http.get(f"/admin/datasets/{ds['id']}/budget").json()["budget_epsilon"] == 8
    metrics = http.get("/metrics").text
    assert f'dpicl_epsilon_spent{{dataset_id="{ds["id"]}"}}' in metrics


def test_tasks_crud(sqlite_server):
    app, http = sqlite_server
    upload(http, "d", jsonl_bytes(dataset_rows(10)))
    r = http.post("/admin/tasks", json=task_spec("mytask", "d", generation=FAST))
    assert r.status_code == 201, r.text
    assert r.json()["source"] == "admin"
    assert "mytask" in {t["name"] for t in http.get("/admin/tasks").json()["data"]}
    assert http.get("/admin/tasks/mytask").json()["upstream"] == "fake-model"
    # The task is a model for clients now.
    assert "mytask" in {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert_openai_error(http.post("/admin/tasks", json=task_spec("x", "d", upstream="nope")), 400)
    assert_openai_error(http.post("/admin/tasks", json=task_spec("fake-model", "d")), 409)
    assert_openai_error(http.post("/admin/tasks", json={"name": "y"}), 400)
    assert_openai_error(http.post("/admin/tasks", json=task_spec("z", "d", epsilon=-1)), 400)
    assert http.delete("/admin/tasks/mytask").status_code == 200
    assert_openai_error(http.get("/admin/tasks/mytask"), 404)
    assert_openai_error(http.delete("/admin/tasks/mytask"), 404)


def test_tasks_are_validated_at_the_door(server):
    """What used to be accepted and fail only at warm-up is refused at creation with a 400 one-liner."""
    app, http = server
    upload(http, "door", jsonl_bytes(dataset_rows(10)), epsilon=2.0)

    def refused(spec: dict, code: str, *words: str, query: str = "") -> None:
        r = http.post("/admin/tasks" + query, json=spec)
        err = assert_openai_error(r, 400)
        assert err["code"] == code and "\n" not in err["message"], err
        assert all(w in err["message"] for w in words), err["message"]
        assert spec["name"] not in {t["name"] for t in http.get("/admin/tasks").json()["data"]}

    refused(task_spec("t-missing", "never-uploaded"), "dataset_not_found", "never-uploaded", "allow_missing_dataset")
    refused(task_spec("t-labels", "door", labels=["LOC", "COLOUR"]), "invalid_task", "COLOUR", "door")
    refused(task_spec("t-eps", "door", epsilon=2.5), "invalid_task", "2.5", "whole budget 2")
    refused(task_spec("a/b", "door"), "invalid_task", "'/'")
    # Within the dataset's domain and budget: created and ready.
    ok = http.post("/admin/tasks", json=task_spec("t-ok", "door", epsilon=2.0, labels=["LOC"]))
    assert ok.status_code == 201 and ok.json()["status"] == "ready", ok.text
    # A later budget change is the admin's right; the task then shows why it cannot be warmed.
    assert http.put("/admin/budget/door", json={"epsilon": 1.5}).status_code == 200
    listed = {t["name"]: t for t in http.get("/admin/tasks").json()["data"]}
    assert listed["t-ok"]["status"] == "invalid" and "whole budget" in listed["t-ok"]["status_detail"]
    # A task may name a dataset uploaded later when it says so: it waits, it is not broken.
    r = http.post("/admin/tasks?allow_missing_dataset=true", json=task_spec("t-wait", "later"))
    assert r.status_code == 201 and r.json()["status"] == "waiting", r.text
    assert http.get("/admin/tasks/t-wait").json()["status_detail"] == "dataset 'later' is not uploaded yet"
    # Nothing is cached for it, which is an answer, not an error (the console's Tasks page reads this).
    demos = http.get("/admin/tasks/t-wait/demos")
    assert demos.status_code == 200 and demos.json()["cached"] is False and demos.json()["status"] == "waiting"
    upload(http, "later", jsonl_bytes(dataset_rows(10)))
    assert http.get("/admin/tasks/t-wait").json()["status"] == "ready"


def test_a_generator_that_cannot_load_charges_nothing(sqlite_server):
    """A server without the model's extra used to charge the warm-up, then fail loading the model."""
    app, http = sqlite_server
    upload(http, "nomodel", jsonl_bytes(dataset_rows(10)))
    assert http.post("/admin/tasks", json=task_spec("nm", "nomodel", generation=FAST)).status_code == 201

    def missing(task):
        raise ModuleNotFoundError(f"No module named 'torch' {CANARY}", name="torch")

    app.state.demos.generators.source = missing
    r = http.post("/admin/tasks/nm/demos", json={"wait": True})
    text = r.text if r.status_code >= 400 else str(r.json().get("error"))
    assert "torch" in text and "dpicl[local]" in text and "nothing was charged" in text, r.text
    _no_canary(r)
    assert app.state.store.ledger("nomodel") == []


def test_client_keys_name_existing_tasks(server):
    app, http = server
    upload(http, "kd", jsonl_bytes(dataset_rows(5)))
    assert http.post("/admin/tasks", json=task_spec("kt", "kd")).status_code == 201
    r = http.post("/admin/keys", json={"name": "k-bad", "tasks": ["kt", "no-such-task"]})
    err = assert_openai_error(r, 400)
    assert err["code"] == "task_not_found" and "no-such-task" in err["message"] and "kt'" not in err["message"]
    assert "k-bad" not in {k["name"] for k in http.get("/admin/keys").json()["data"]}
    for i, tasks in enumerate((["kt"], ["*"], [])):
        made = http.post("/admin/keys", json={"name": f"k{i}", "tasks": tasks})
        assert made.status_code == 201, made.text


def test_warm_dry_run_then_real_then_cache(sqlite_server):
    app, http = sqlite_server
    ds = upload(http, "w", jsonl_bytes(dataset_rows(100)), epsilon=10).json()
    http.post("/admin/tasks", json=task_spec("w1", "w", generation={**FAST, "sigma": 1.5}, shots=2))
    reads = _count_row_reads(app)
    dry = http.post("/admin/tasks/w1/demos", json={"dry_run": True})
    assert dry.status_code == 200, dry.text
    d = dry.json()
    assert d["dry_run"] is True and d["fits"] is True and d["epsilon_cost"] > 0
    assert d["remaining_after"] == pytest.approx(10 - d["epsilon_cost"])
    assert http.get(f"/admin/datasets/{ds['id']}/budget").json()["entries"] == []  # nothing charged
    assert reads[0] == 0
    assert http.get("/admin/tasks/w1/demos").json()["cached"] is False

    w = http.post("/admin/tasks/w1/demos", json={"dry_run": False, "wait": True})
    assert w.status_code == 200, w.text
    view = w.json()
    assert view["object"] == "warmup" and view["state"] == "done" and view["charged"] is True
    assert view["tokens_done"] == view["tokens_total"] == 2 * len(LABELS) * FAST["max_tokens"]
    out = view["result"]
    # The first warm-up also paid the one-time pool-size release: its cost is the whole spend.
    assert view["epsilon_cost"] == pytest.approx(out["spent_epsilon"])
    assert out["charged"] is True and len(out["demonstrations"]) == 2 * len(LABELS)
    assert {x["label"] for x in out["demonstrations"]} == set(LABELS)
    assert 0 < out["epsilon"] <= out["spent_epsilon"] + 1e-9
    status = http.get(f"/admin/datasets/{ds['id']}/budget").json()
    assert status["spent_epsilon"] == pytest.approx(out["spent_epsilon"])
    assert status["spent_epsilon"] == pytest.approx(10 - out["remaining_epsilon"])
    entries = len(status["entries"])

    # Warming again serves the cache: no charge, same set.
    again = http.post("/admin/tasks/w1/demos", json={})
    assert again.status_code == 200 and again.json()["state"] == "done" and again.json()["charged"] is False
    assert again.json()["epsilon_cost"] == 0
    assert again.json()["result"]["demonstrations"] == out["demonstrations"]
    assert len(http.get(f"/admin/datasets/{ds['id']}/budget").json()["entries"]) == entries
    cached = http.get("/admin/tasks/w1/demos").json()
    assert cached["cached"] is True and cached["demonstrations"]["demos"] == out["demonstrations"]
    # Drop it: the next warm-up pays again.
    assert http.delete("/admin/tasks/w1/demos").json()["deleted"] == 1
    assert http.get("/admin/tasks/w1/demos").json()["cached"] is False
    queued = http.post("/admin/tasks/w1/demos", json={})
    assert queued.status_code == 202 and queued.json()["state"] in ("queued", "running")
    stated = queued.json()["epsilon_cost"]
    w2 = http.post("/admin/tasks/w1/demos", json={"wait": True})  # joins the queued one
    assert w2.status_code == 200 and w2.json()["charged"] is True and w2.json()["id"] == queued.json()["id"]
    # Pool sizes are known now: the cost stated at queue time is what was charged at the start.
    assert w2.json()["epsilon_cost"] == pytest.approx(stated, rel=1e-6)
    assert http.get(f"/admin/warmups/{w2.json()['id']}").json()["state"] == "done"
    assert len(http.get(f"/admin/datasets/{ds['id']}/budget").json()["entries"]) > entries


def test_concurrent_same_key_generates_once(sqlite_server):
    app, http = sqlite_server
    ds = upload(http, "c", jsonl_bytes(dataset_rows(100)), epsilon=50).json()
    http.post("/admin/tasks", json=task_spec("c1", "c", generation={**FAST, "sigma": 1.5}))
    results: list[httpx.Response] = []

    def hit():
        results.append(httpx.post(str(http.base_url) + "/admin/tasks/c1/demos", json={"wait": True},
                                  headers=admin_headers(), timeout=120))

    threads = [threading.Thread(target=hit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200] * 6
    assert len({str(r.json()["result"]["demonstrations"]) for r in results}) == 1
    # Concurrent requests joined one warm-up (or found its set cached): one charged run.
    charged = {r.json()["id"] for r in results if r.json()["charged"]}
    assert len(charged) == 1
    entries = http.get(f"/admin/datasets/{ds['id']}/budget").json()["entries"]
    assert len([e for e in entries if e["partition"] != "*"]) == len(LABELS)  # one set charged


def test_over_budget_refusal_reads_nothing(server):
    app, http = server
    ds = upload(http, "o", jsonl_bytes(dataset_rows(100)), epsilon=1.0).json()
    # sigma 0.5 costs about 12, far more than 1.0.
    http.post("/admin/tasks", json=task_spec("greedy", "o", generation={**FAST, "sigma": 0.5}))
    reads = _count_row_reads(app)
    dry = http.post("/admin/tasks/greedy/demos", json={"dry_run": True}).json()
    assert dry["fits"] is False and dry["remaining_after"] < 0
    err = assert_openai_error(http.post("/admin/tasks/greedy/demos", json={}), 402)
    assert "remains" in err["message"] and "1.00" in err["message"]
    assert http.get(f"/admin/datasets/{ds['id']}/budget").json()["entries"] == []  # ledger unchanged
    assert reads[0] == 0  # no row read (not even for the pool sizes)

    # Now fix the DP pool sizes with a cheap task, then refuse again: still nothing read or charged.
    http.post("/admin/tasks", json=task_spec("mid", "o", generation={**FAST, "sigma": 6.0}))
    assert http.post("/admin/tasks/mid/demos", json={"wait": True}).status_code == 200
    before = http.get(f"/admin/datasets/{ds['id']}/budget").json()
    reads[0] = 0
    err = assert_openai_error(http.post("/admin/tasks/greedy/demos", json={}), 402)
    assert f"{before['remaining_epsilon']:.2f}" in err["message"]
    after = http.get(f"/admin/datasets/{ds['id']}/budget").json()
    assert after["entries"] == before["entries"] and reads[0] == 0
    assert after["spent_epsilon"] <= after["budget_epsilon"]


def test_client_generation_on_first_use(sqlite_server):
    """on_missing=generate: a client request starts a background warm-up (charged to the client)
    and gets 503 + Retry-After at once; once the set is cached it is served."""
    app, http = sqlite_server
    ds = upload(http, "g", jsonl_bytes(dataset_rows(100)), epsilon=10).json()
    http.post("/admin/tasks", json=task_spec("gen", "g", generation={**FAST, "sigma": 1.5}, on_missing="generate"))
    http.post("/admin/tasks", json=task_spec("nobudget", "g", generation={**FAST, "sigma": 0.4},
                                             on_missing="generate"))
    from tests.test_app_support import CLIENT_KEY

    client = {"Authorization": f"Bearer {CLIENT_KEY}"}
    body = {"model": "gen", "messages": [{"role": "user", "content": "Question: where?"}]}
    r = http.post("/v1/chat/completions", json=body, headers=client)
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) > 0 and r.json()["error"]["code"] == "demos_warming"
    assert "wu_" not in r.text  # clients learn nothing about warm-ups
    for _ in range(600):
        r = http.post("/v1/chat/completions", json=body, headers=client)
        if r.status_code != 503:
            break
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    entries = http.get(f"/admin/datasets/{ds['id']}/budget").json()["entries"]
    assert {e["actor"] for e in entries} == {"client:app1"}
    runs = [w for w in http.get("/admin/warmups").json()["data"] if w["task"] == "gen"]
    # The 503s joined one charged warm-up. A request that reached the warm-up service just after the
    # set was stored gets a finished record of the cached set (charged nothing): allowed.
    charged = [w for w in runs if w["charged"]]
    assert len(charged) == 1 and charged[0]["state"] == "done", runs
    assert all(w["state"] in ("done", "cancelled") for w in runs if w not in charged), runs
    audited = [x for x in http.get("/admin/audit").json()["data"] if x["action"] == "warmup.start"]
    # Every warm-up a client request created is audited, the charged one and any such late no-op.
    assert {(x["actor"], x["target"], x["details"]["trigger"]) for x in audited} == {("app1", "gen", "client")}
    assert sorted(x["details"]["warmup_id"] for x in audited) == sorted(w["id"] for w in runs)
    assert http.post("/v1/chat/completions", json=body, headers=client).status_code == 200
    assert len(http.get(f"/admin/datasets/{ds['id']}/budget").json()["entries"]) == len(entries)
    # Over budget: 503 while the warm-up is tried, then a clean error that reveals no budget numbers.
    nb = {**body, "model": "nobudget"}
    for _ in range(600):
        r = http.post("/v1/chat/completions", json=nb, headers=client)
        if r.status_code != 503:
            break
        time.sleep(0.1)
    err = assert_openai_error(r, 402)
    assert "POST /admin/tasks/nobudget/demos" in err["message"] and "remains" not in err["message"]
    runs = [w for w in http.get("/admin/warmups").json()["data"] if w["task"] == "nobudget"]
    failed = [w for w in runs if w["state"] == "failed"]
    # One failed run; a request that raced its failure withdrew its own (queued, uncharged) warm-up.
    assert len(failed) == 1 and failed[0]["error"]["code"] == "budget_exceeded"
    assert all(w["state"] == "cancelled" and not w["charged"] for w in runs if w not in failed)
