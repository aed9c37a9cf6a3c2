"""Warm-up crash recovery and cancelling a running warm-up (issue 20 section 2, issue 21 section 3).

A process that restarts under its name settles at once what its previous incarnation held (queued
warm-ups run, running ones are lost), a new request never joins a dead warm-up, a live replica's
warm-ups are left alone, a running warm-up stops at the next token when cancelled (its charge
stays and its view says so), and a ``dpicl worker`` killed with ``kill -9`` does not leave its work
horse generating unseen.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from typer.testing import CliRunner

from proxy.app import create_app
from proxy.task_config import TaskConfig
from proxy.serving.warmup_owner import Owner, _host_identity, owner_dead, previous_incarnation
from proxy.serving.warmups import WarmupService
from tests.test_app_support import (  # noqa: F401 - fixtures
    ADMIN_KEY, LABELS, LiveServer, admin_headers, assert_openai_error, dataset_rows, fake_upstream, jsonl_bytes,
    make_config, task_spec, tiny_model_dir, upload,
)
from tests.test_warmups import FAST, _ledger, _wait_state, live  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parent.parent


def _dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_owner_liveness_is_only_decided_when_certain():
    me = Owner("server:a", _host_identity(), "me-run")
    mine = {"owner": "server:a", "owner_host": me.host, "owner_pid": os.getpid(), "owner_run": "me-run"}
    assert not owner_dead(mine, me) and not previous_incarnation(mine, me)
    # An earlier process with our PID (a container restarted as PID 1 again): ours, and dead.
    earlier = {**mine, "owner_run": "old"}
    assert owner_dead(earlier, me) and previous_incarnation(earlier, me)
    # A process on this host that is gone: dead whatever its name.
    gone = {**earlier, "owner": "server:b", "owner_pid": _dead_pid()}
    assert owner_dead(gone, me) and not previous_incarnation(gone, me)
    # A live sibling on this host under the same (default) name: alive, not ours.
    sibling = {**earlier, "owner_pid": os.getppid()}
    assert not owner_dead(sibling, me) and not previous_incarnation(sibling, me)
    # Another host (or PID namespace): we cannot tell, the heartbeat decides, unless it is our name.
    remote = {**gone, "owner_host": "elsewhere/pid:[1]"}
    assert not owner_dead(remote, me) and not previous_incarnation(remote, me)
    assert previous_incarnation({**remote, "owner": "server:a"}, me)
    assert not owner_dead({"state": "running"}, me)  # records from before owners: heartbeat only


def _forge(app, name: str, owner: Owner, state: str = "queued", pid: int | None = None, **fields) -> dict:
    """A warm-up record as another process (``owner``) would have left it in the store."""
    demos = app.state.demos
    task = TaskConfig.model_validate(app.state.store.get_task(name))
    svc = WarmupService(app.state.store, demos.warmup, SimpleNamespace(kind="rq"))  # stamps no owner
    rec, created = svc._create_sync(task, demos._prepare(task), "admin", True)
    assert created
    now = time.time()
    extra = {**owner.fields(), "runner": "inprocess"}
    if pid is not None:
        extra["owner_pid"] = pid
    if state == "running":
        extra.update(started_at=now, charged=True)
    return app.state.store.update_warmup(rec["id"], state=state, heartbeat_at=now, **extra, **fields)


def test_a_restart_settles_what_its_previous_incarnation_held(tmp_path, fake_upstream, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("DPICL_INSTANCE_ID", "inst-a")
    cfg = make_config(f"sqlite:///{tmp_path}/s.db", fake_upstream.base_url, tiny_model_dir, client_tasks=["*"])
    host = _host_identity()
    app = create_app(cfg)
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=120, headers=admin_headers()) as http:
        ds = upload(http, "r", jsonl_bytes(dataset_rows(100)), epsilon=50).json()
        for i, name in enumerate(("run", "queued", "sibling", "remote")):
            assert http.post("/admin/tasks", json=task_spec(name, "r", generation=FAST, seed=i)).status_code == 201
        # What a server "inst-a" killed with kill -9 left behind (heartbeats still fresh): one running
        # warm-up and one queued in its memory. Another live process on this host under the same
        # name, and a replica on another host, each run one too.
        old = Owner("server:inst-a", host, "old-run")
        running = _forge(app, "run", old, "running", epsilon_cost=0.45)
        queued = _forge(app, "queued", old)
        sibling = _forge(app, "sibling", Owner("server:inst-a", host, "sib"), "running", pid=os.getppid())
        remote = _forge(app, "remote", Owner("server:inst-b", "elsewhere/pid:[1]", "rem"), "running")
    # The restart (same instance id, same store).
    app = create_app(cfg)
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=120, headers=admin_headers()) as http:
        store = app.state.store
        # Settled at start-up, before anyone read them (no 90 s wait).
        lost = store.get_warmup(running["id"])
        assert lost["state"] == "lost" and lost["error"]["code"] == "warmup_lost" and lost["charged"]
        view = http.get(f"/admin/warmups/{running['id']}").json()
        assert view["state"] == "lost" and view["note"].startswith("its epsilon cost stays spent")
        assert store.get_warmup(queued["id"])["owner_run"] == app.state.demos.warmups.owner.run
        done = _wait_state(http, queued["id"], ("done", "failed", "lost"))
        assert done["state"] == "done" and done["charged"] and done["result"]["demonstrations"]
        # Live processes' warm-ups are left alone.
        assert http.get(f"/admin/warmups/{sibling['id']}").json()["state"] == "running"
        assert http.get(f"/admin/warmups/{remote['id']}").json()["state"] == "running"
        rerun = http.post("/admin/tasks/run/demos", json={})
        assert rerun.status_code == 202 and rerun.json()["id"] != running["id"]
        _wait_state(http, rerun.json()["id"], ("done", "failed"))
    assert ds["id"]


def test_a_new_request_never_joins_a_dead_warmup(live):
    """The active warm-up of a set belongs to a process on this host that is gone (another
    instance's, heartbeat still fresh): a new request settles it and queues a new one."""
    app, http = live
    upload(http, "j", jsonl_bytes(dataset_rows(100)), epsilon=50)
    http.post("/admin/tasks", json=task_spec("join", "j", generation=FAST))
    dead = _forge(app, "join", Owner("server:inst-c", _host_identity(), "c"), "running", pid=_dead_pid())
    again = http.post("/admin/tasks/join/demos", json={})
    assert again.status_code == 202 and again.json()["id"] != dead["id"]
    view = http.get(f"/admin/warmups/{dead['id']}").json()
    assert view["state"] == "lost" and view["note"].startswith("its epsilon cost stays spent")
    assert _wait_state(http, again.json()["id"], ("done", "failed"))["state"] == "done"


def test_a_running_warmup_stops_at_the_next_token_when_cancelled(live, monkeypatch):
    import proxy.serving.warmup as warmup_mod
    import proxy.serving.warmup_executor as executor_mod
    from proxy.cli import app as cli

    app, http = live
    monkeypatch.setattr(executor_mod, "CANCEL_POLL", 0.0)  # look at the record before every token
    entered, resume = threading.Event(), threading.Event()
    real = warmup_mod.generate_demonstration

    def held(*args, on_token=None, **kwargs):
        def token(step):
            on_token(step)
            if not entered.is_set():  # hold the generation after its first token
                entered.set()
                assert resume.wait(60)
        return real(*args, on_token=token, **kwargs)

    monkeypatch.setattr(warmup_mod, "generate_demonstration", held)
    ds = upload(http, "c", jsonl_bytes(dataset_rows(100)), epsilon=50).json()
    http.post("/admin/tasks", json=task_spec("c1", "c", generation={**FAST, "max_tokens": 8}))
    wid = http.post("/admin/tasks/c1/demos", json={}).json()["id"]
    assert entered.wait(60)
    env = {"DPICL_URL": str(http.base_url), "DPICL_ADMIN_KEY": ADMIN_KEY, "COLUMNS": "200"}
    out = CliRunner().invoke(cli, ["tasks", "cancel", wid], env=env)
    assert out.exit_code == 0 and "asked to stop" in out.stdout, out.output
    asked = http.get(f"/admin/warmups/{wid}").json()
    assert asked["state"] == "running" and asked["cancel_requested"] and asked["charged"]
    resume.set()
    view = _wait_state(http, wid, ("cancelled", "done", "failed"))
    assert view["state"] == "cancelled" and view["error"]["code"] == "warmup_cancelled"
    assert view["tokens_done"] < view["tokens_total"] and view["result"] is None
    assert view["charged"] and view["epsilon_cost"] > 0 and view["note"].startswith("its epsilon cost stays spent")
    assert _ledger(http, ds["id"])  # the charge stays in the ledger
    assert http.get("/admin/tasks/c1/demos").json()["cached"] is False  # a stopped set is not stored
    audit = http.get("/admin/audit").json()["data"]
    assert any(e["action"] == "warmup.cancel" and e["details"]["warmup_id"] == wid
               and e["details"]["was"] == "running" for e in audit)
    assert assert_openai_error(http.post(f"/admin/warmups/{wid}/cancel"), 409)["code"] == "warmup_finished"
    listed = CliRunner().invoke(cli, ["tasks", "warmups", "--json"], env=env)
    assert listed.exit_code == 0 and '"cancelled"' in listed.stdout
    again = CliRunner().invoke(cli, ["tasks", "warmups", "cancel", wid], env=env)
    assert again.exit_code != 0 and "warmup_finished" in again.stderr and "Traceback" not in again.output


SLOW_WORKER = """
import sys, time
import proxy.serving.warmup as w
real = w.generate_demonstration
def slow(*args, on_token=None, **kwargs):
    def token(step):
        on_token(step)
        time.sleep(0.2)  # a slow generator: the test kills the worker mid-generation
    return real(*args, on_token=token, **kwargs)
w.generate_demonstration = slow
from proxy.cli import app
sys.argv = ["dpicl", *sys.argv[1:]]
app()
"""


def test_killing_the_worker_stops_its_work_horse(tmp_path, redis_url, fake_upstream, tiny_model_dir):
    """``kill -9`` of ``dpicl worker``'s main process: RQ's work horse (its own session) notices before
    its next token, stops, and records the warm-up lost with its charge kept; it does not go on."""
    import yaml

    store_url = f"sqlite:///{tmp_path}/s.db"
    cfg = make_config(store_url, fake_upstream.base_url, tiny_model_dir, client_tasks=["*"])
    cfg.jobs = cfg.jobs.model_copy(update={"queue_url": redis_url})
    worker_cfg = tmp_path / "worker.yaml"
    worker_cfg.write_text(yaml.safe_dump({"server": {"local_model": tiny_model_dir}}))
    script = tmp_path / "slow_worker.py"
    script.write_text(SLOW_WORKER)
    app = create_app(cfg)
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=120, headers=admin_headers()) as http:
        ds = upload(http, "k", jsonl_bytes(dataset_rows(100)), epsilon=50).json()
        http.post("/admin/tasks", json=task_spec("k1", "k", generation={**FAST, "max_tokens": 40}))
        wid = http.post("/admin/tasks/k1/demos", json={}).json()["id"]
        env = dict(os.environ, PYTHONPATH=str(REPO), LITELLM_LOCAL_MODEL_COST_MAP="True")
        env.pop("DPICL_CONFIG", None)
        log = tmp_path / "worker.log"
        worker = subprocess.Popen(
            [sys.executable, str(script), "worker", "--redis", redis_url, "--store", store_url,
             "--config", str(worker_cfg), "--name", "w1"],
            cwd=str(REPO), env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"), start_new_session=True)
        horse = None
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                view = http.get(f"/admin/warmups/{wid}").json()
                if view["state"] == "running" and view["charged"] and view["tokens_done"] > 0:
                    break
                assert view["state"] in ("queued", "running"), view
                time.sleep(0.1)
            else:
                raise AssertionError(log.read_text()[-3000:])
            rec = app.state.store.get_warmup(wid)
            horse = rec["owner_pid"]
            assert rec["owner"] == "worker:w1" and horse != worker.pid
            os.kill(worker.pid, signal.SIGKILL)  # the main process only, not its group
            worker.wait()
            lost = _wait_state(http, wid, ("lost", "done", "failed"), timeout=60)
            assert lost["state"] == "lost", lost
            assert "main process died" in lost["error"]["message"] and lost["tokens_done"] < lost["tokens_total"]
            assert lost["note"].startswith("its epsilon cost stays spent") and _ledger(http, ds["id"])
            deadline = time.monotonic() + 30  # the horse exits after recording it
            while time.monotonic() < deadline and _alive(horse):
                time.sleep(0.1)
            assert not _alive(horse)
        finally:
            for pid in (worker.pid, horse):
                if pid and _alive(pid):
                    os.kill(pid, signal.SIGKILL)
            if worker.poll() is None:
                worker.wait()


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie child of someone else counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_console_warmups_page_shows_cancel_requests_and_kept_charges(tmp_path, fake_upstream, tiny_model_dir):
    """The console's warm-ups page: a running warm-up asked to stop says so (and offers no second
    cancel); a cancelled or lost one that was charged says its cost stays spent."""
    from tests.test_console import CHROMIUM

    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    cfg = make_config(f"sqlite:///{tmp_path}/s.db", fake_upstream.base_url, tiny_model_dir)
    app = create_app(cfg)
    with LiveServer(app) as srv:
        store, now = app.state.store, time.time()
        base = {"task": "t", "tokens_done": 3, "tokens_total": 9, "epsilon_cost": 0.45, "created_at": now,
                "started_at": now, "heartbeat_at": now, "runner": "inprocess"}
        store.create_warmup({**base, "id": "wu_asked", "state": "running", "charged": True, "cancel_requested": True})
        store.create_warmup({**base, "id": "wu_stopped", "state": "cancelled", "charged": True, "finished_at": now})
        store.create_warmup({**base, "id": "wu_queued", "state": "cancelled", "charged": False, "finished_at": now,
                             "started_at": None, "tokens_done": 0})
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{srv.url}/admin/ui/")
            page.fill("#admin-key", ADMIN_KEY)
            page.click("#signin-form button")
            page.wait_for_selector('#page[data-page="datasets"]')
            page.goto(f"{srv.url}/admin/ui/#warmups")
            page.wait_for_selector('#page[data-page="warmups"]')
            page.wait_for_selector("[data-note='wu_stopped']")
            assert page.locator("[data-cancel='wu_asked']").count() == 0
            text = page.inner_text("#page")
            notes = {w: page.locator(f"[data-note='{w}']").all_inner_texts()
                     for w in ("wu_stopped", "wu_queued", "wu_asked")}
            browser.close()
    assert "running (cancel requested)" in text and errors == []
    assert notes["wu_stopped"][0].startswith("its epsilon cost stays spent")
    assert notes["wu_queued"] == ["nothing was charged"]
    assert notes["wu_asked"] == []  # still running: no note yet (and no second cancel button)
