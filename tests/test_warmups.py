"""Warm-ups as resources (issue 11, parts 1-2): their own executor, charged when they start,
cancellable while queued, progress and clean errors, empty demonstrations kept out of prompts."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import httpx
import pytest

from proxy.app import create_app
from tests.test_app_support import (  # noqa: F401 - fixtures
    LABELS, LiveServer, admin_headers, assert_openai_error, dataset_rows, fake_upstream, jsonl_bytes,
    make_config, task_spec, tiny_model_dir, upload,
)

FAST = {"mode": "fixed", "num_subsets": 2, "shots_per_subset": 1, "max_tokens": 3, "top_k": 8, "sigma": 1.5}


@contextmanager
def _serve(tmp_path, fake_upstream, tiny_model_dir):
    cfg = make_config(f"sqlite:///{tmp_path}/s.db", fake_upstream.base_url, tiny_model_dir, client_tasks=["*"])
    app = create_app(cfg)
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=120, headers=admin_headers()) as http:
        yield app, http


@pytest.fixture
def live(tmp_path, fake_upstream, tiny_model_dir):
    with _serve(tmp_path, fake_upstream, tiny_model_dir) as pair:
        yield pair


class Gate:
    """Holds every generation at its start until opened; records the threads generations ran on."""

    def __init__(self, app):
        self.open = threading.Event()
        self.entered = threading.Event()
        self.threads: list[str] = []
        warmup = app.state.demos.warmup
        original = warmup.generate

        def gated(*args, **kwargs):
            self.threads.append(threading.current_thread().name)
            self.entered.set()
            assert self.open.wait(600), "the test never opened the gate"
            return original(*args, **kwargs)

        warmup.generate = gated


def _ledger(http, ds_id):
    return http.get(f"/admin/datasets/{ds_id}/budget").json()["entries"]


def _wait_state(http, wid, states, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = http.get(f"/admin/warmups/{wid}").json()
        if view["state"] in states:
            return view
        time.sleep(0.05)
    raise AssertionError(f"warm-up {wid} never reached {states}: {view}")


def test_queued_warmups_cost_nothing_until_they_start_and_can_be_cancelled(live):
    app, http = live
    ds = upload(http, "q", jsonl_bytes(dataset_rows(100)), epsilon=50).json()
    for i in range(3):
        assert http.post("/admin/tasks", json=task_spec(f"t{i}", "q", generation=FAST, seed=i)).status_code == 201
    gate = Gate(app)
    views = [http.post(f"/admin/tasks/t{i}/demos", json={}) for i in range(3)]
    assert [v.status_code for v in views] == [202] * 3
    first, second, third = (v.json() for v in views)
    for v in (first, second, third):
        assert v["object"] == "warmup" and v["id"].startswith("wu_") and v["epsilon_cost"] > 0
        assert v["tokens_total"] == len(LABELS) * FAST["max_tokens"] and v["result"] is None
    assert gate.entered.wait(30)
    # The first is running (held at the gate, before its reservation); the others wait in the queue.
    assert http.get(f"/admin/warmups/{first['id']}").json()["state"] == "running"
    assert http.get(f"/admin/warmups/{second['id']}").json()["state"] == "queued"
    assert _ledger(http, ds["id"]) == []  # nothing reserved for queued (or not yet started) warm-ups
    # Cancel a queued one (a running one: test_a_running_warmup_stops_at_the_next_token_when_cancelled).
    cancelled = http.post(f"/admin/warmups/{second['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert cancelled.json()["note"] == "nothing was charged"
    assert_openai_error(http.post("/admin/warmups/wu_nope/cancel"), 404)
    assert_openai_error(http.get("/admin/warmups/wu_nope"), 404)
    gate.open.set()
    done = _wait_state(http, third["id"], ("done", "failed"))
    assert done["state"] == "done", done
    one = _wait_state(http, first["id"], ("done",))
    assert one["tokens_done"] == one["tokens_total"] and one["eta_seconds"] == 0 and one["seconds_elapsed"] > 0
    assert one["result"]["demonstrations"] and one["finished_at"] >= one["started_at"] >= one["created_at"]
    # Two sets were charged (first and third); the cancelled one never reached the ledger.
    reasons = {e["reason"] for e in _ledger(http, ds["id"]) if e["partition"] != "*"}
    assert len(reasons) == 2
    assert http.get(f"/admin/warmups/{second['id']}").json()["state"] == "cancelled"
    assert assert_openai_error(http.post(f"/admin/warmups/{second['id']}/cancel"), 409)["code"] == "warmup_finished"
    listed = [w["id"] for w in http.get("/admin/warmups").json()["data"]]
    assert listed[:3] == [third["id"], second["id"], first["id"]]  # newest first
    # Generations ran on the dedicated warm-up thread, never on the request thread pool.
    assert set(gate.threads) == {"dpicl-warmup"}


def test_waiting_warmups_hold_no_request_thread(live):
    """More warm-ups than the request pool has threads queue at once, and the server still
    answers readiness and admin reads while they wait (no timing asserted)."""
    app, http = live
    upload(http, "p", jsonl_bytes(dataset_rows(100)), epsilon=100)  # MAX_BUDGET_EPSILON; the warm-ups are held before they charge
    n = 45
    for i in range(n):
        http.post("/admin/tasks", json=task_spec(f"p{i}", "p", generation=FAST, seed=i))
    gate = Gate(app)
    ids = [http.post(f"/admin/tasks/p{i}/demos", json={}).json()["id"] for i in range(n)]
    assert len(set(ids)) == n
    assert gate.entered.wait(30)
    assert http.get("/health/readiness").status_code == 200
    assert http.get("/admin/datasets").status_code == 200
    states = [w["state"] for w in http.get("/admin/warmups").json()["data"]]
    assert states.count("running") == 1 and states.count("queued") == n - 1
    # A second POST for a queued set joins it instead of queueing a duplicate.
    again = http.post("/admin/tasks/p7/demos", json={})
    assert again.status_code == 202 and again.json()["id"] == ids[7]
    for wid in ids[1:]:
        assert http.post(f"/admin/warmups/{wid}/cancel").status_code == 200
    gate.open.set()
    assert _wait_state(http, ids[0], ("done", "failed"))["state"] == "done"


def test_empty_demonstrations_are_not_injected(live, monkeypatch):
    app, http = live
    upload(http, "e", jsonl_bytes(dataset_rows(100)), epsilon=50)
    http.post("/admin/tasks", json=task_spec("e1", "e", generation=FAST, shots=2))
    import proxy.serving.warmup as warmup_mod

    real = warmup_mod.generate_demonstration
    calls = [0]

    def some_empty(source, prompt, pool, label, *args, **kwargs):
        d = real(source, prompt, pool, label, *args, **kwargs)
        calls[0] += 1
        if label == LABELS[0]:
            d.text = "   "  # what a set whose generation stopped at once looks like
        return d

    monkeypatch.setattr(warmup_mod, "generate_demonstration", some_empty)
    view = http.post("/admin/tasks/e1/demos", json={"wait": True}).json()
    assert view["state"] == "done" and calls[0] == 2 * len(LABELS)
    result = view["result"]
    assert result["empty_labels"] == [LABELS[0]]
    assert all(d["text"].strip() for d in result["demonstrations"])
    assert {d["label"] for d in result["demonstrations"]} == set(LABELS[1:])
    cached = http.get("/admin/tasks/e1/demos").json()["demonstrations"]
    assert cached["empty_labels"] == [LABELS[0]] and cached["demos"] == result["demonstrations"]


def test_progress_lines_are_json(live):
    from tests.test_app_support import capture_logs

    app, http = live
    upload(http, "g", jsonl_bytes(dataset_rows(100)), epsilon=50)
    http.post("/admin/tasks", json=task_spec("g1", "g", generation=FAST))
    with capture_logs() as logs:
        view = http.post("/admin/tasks/g1/demos", json={"wait": True}).json()
    assert view["state"] == "done"
    import json

    events = [json.loads(line) for line in logs.lines if '"warmup.' in line]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "warmup.queued" and "warmup.started" in kinds and kinds[-1] == "warmup.done"
    progress = [e for e in events if e["event"] == "warmup.progress"]
    assert progress and progress[-1]["tokens_done"] == progress[-1]["tokens_total"] == view["tokens_total"]
    assert all(e["warmup_id"] == view["id"] for e in events)


def test_dry_run_queues_nothing(live):
    app, http = live
    ds = upload(http, "d", jsonl_bytes(dataset_rows(100)), epsilon=50).json()
    http.post("/admin/tasks", json=task_spec("d1", "d", generation=FAST))
    dry = http.post("/admin/tasks/d1/demos", json={"dry_run": True})
    assert dry.status_code == 200 and dry.json()["epsilon_cost"] > 0
    assert http.get("/admin/warmups").json()["data"] == [] and _ledger(http, ds["id"]) == []
    for bad in ({"wait": "yes"}, {"dry_run": True, "x": 1}):
        assert_openai_error(http.post("/admin/tasks/d1/demos", json=bad), 400)


def test_warmups_run_on_dpicl_worker_with_redis(tmp_path, redis_url, fake_upstream, tiny_model_dir):
    """With a queue configured, the server only queues: the warm-up runs in a ``dpicl worker``."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    store_url = f"sqlite:///{tmp_path}/s.db"
    cfg = make_config(store_url, fake_upstream.base_url, tiny_model_dir, client_tasks=["*"])
    cfg.jobs = cfg.jobs.model_copy(update={"queue_url": redis_url})
    worker_cfg = tmp_path / "worker.yaml"
    worker_cfg.write_text(yaml.safe_dump({"server": {"local_model": tiny_model_dir}}))
    repo = Path(__file__).resolve().parent.parent
    app = create_app(cfg)
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=120, headers=admin_headers()) as http:
        ds = upload(http, "r", jsonl_bytes(dataset_rows(100)), epsilon=50).json()
        http.post("/admin/tasks", json=task_spec("r1", "r", generation=FAST))
        queued = http.post("/admin/tasks/r1/demos", json={})
        assert queued.status_code == 202 and queued.json()["runner"] == "rq"
        time.sleep(0.5)
        assert http.get(f"/admin/warmups/{queued.json()['id']}").json()["state"] == "queued"  # no worker yet
        assert _ledger(http, ds["id"]) == []
        env = dict(os.environ, PYTHONPATH=str(repo), LITELLM_LOCAL_MODEL_COST_MAP="True")
        env.pop("DPICL_CONFIG", None)
        log = tmp_path / "worker.log"
        worker = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "worker", "--redis", redis_url, "--store", store_url,
             "--config", str(worker_cfg), "--burst"],
            cwd=str(repo), env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"), start_new_session=True)
        try:
            done = _wait_state(http, queued.json()["id"], ("done", "failed"), timeout=120)
            assert done["state"] == "done", done["error"]
            assert done["charged"] and done["result"]["demonstrations"]
            assert worker.wait(timeout=180) == 0, log.read_text()[-3000:]  # --burst: exits when the queue is empty
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        stderr = log.read_text()
        assert '"event":"warmup.progress"' in stderr  # JSON progress lines in the worker's log
        # The server serves the set the worker stored.
        cached = http.get("/admin/tasks/r1/demos").json()
        assert cached["cached"] is True and cached["demonstrations"]["demos"] == done["result"]["demonstrations"]


def test_a_warmup_whose_process_died_is_shown_lost(store):
    """No heartbeat for STALE_AFTER: queued in-process and running warm-ups read as lost (RQ-queued
    ones wait for a worker; a server with an in-process runner adopts the queued one instead); the
    error and the view's note say whether anything was charged."""
    from proxy.serving.warmups import STALE_AFTER, WarmupService, public_view

    old = time.time() - STALE_AFTER - 1
    base = {"task": "t", "heartbeat_at": old, "created_at": old}
    store.create_warmup({"id": "q", "state": "queued", "runner": "inprocess", "charged": False, **base})
    store.create_warmup({"id": "r", "state": "running", "runner": "rq", "charged": True, **base})
    store.create_warmup({"id": "rq", "state": "queued", "runner": "rq", **base})
    store.create_warmup({"id": "fresh", "state": "running", "runner": "inprocess", **{**base, "heartbeat_at": time.time()}})
    svc = WarmupService(store, warmup=None, runner=None)  # type: ignore[arg-type]
    q, r = svc.get("q"), svc.get("r")
    assert q["state"] == r["state"] == "lost" and q["error"]["code"] == r["error"]["code"] == "warmup_lost"
    assert "nothing was charged" in q["error"]["message"] and "stays spent" in r["error"]["message"]
    assert public_view(r)["note"].startswith("its epsilon cost stays spent")
    assert svc.get("rq")["state"] == "queued" and svc.get("fresh")["state"] == "running"


def test_a_finished_warmup_says_where_its_time_went(live):
    """Admin-only split of the warm-up's seconds (benchmarks/warm_e2e.py prints it)."""
    app, http = live
    upload(http, "t", jsonl_bytes(dataset_rows(100)), epsilon=50)
    http.post("/admin/tasks", json=task_spec("t1", "t", generation=FAST))
    view = http.post("/admin/tasks/t1/demos", json={"wait": True}).json()
    assert view["state"] == "done"
    parts = view["result"]["timings"]
    assert set(parts) == {"forward", "sampling", "accounting", "store", "load", "other", "total"}
    assert all(v >= 0 for v in parts.values())
    assert parts["forward"] > 0 and parts["accounting"] > 0  # the model ran; the plan was priced and charged
    named = sum(v for k, v in parts.items() if k != "total")
    assert named == pytest.approx(parts["total"], abs=0.01)
