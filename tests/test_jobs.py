"""Offline jobs through the admin API: in-process runner, a real Redis queue with ``dpicl worker``
subprocesses, cancellation, a worker killed mid-job and over-budget refusal."""

from __future__ import annotations

import collections
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import dp_accounting as dpa
import pytest

from aggregation.accounting import event_from_dict
from aggregation.pe import allocate
from proxy.jobs import JobManager, PEBackend
from tests.test_pe import bow_embed, word_apis

ADMIN_KEY = "jobs-admin-key"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
CANARY = "QQZCANARY4242"
REPO = Path(__file__).resolve().parents[1]


# -- PE backends loaded by the app and by worker subprocesses ("tests.test_jobs:...") -------------


def tiny_pe_backend(ctx: Any, record: dict, prompt: Any) -> PEBackend:
    random_api, variation_api = word_apis(record.get("seed") or 0)
    return PEBackend(random_api, variation_api, bow_embed)


def slow_pe_backend(ctx: Any, record: dict, prompt: Any) -> PEBackend:
    """Each VARIATION call takes 0.3 s, so a job stays running long enough to act on it."""
    random_api, variation_api = word_apis(0)

    def slow_variation(texts: list[str], label: str) -> list[str]:
        time.sleep(0.3)
        return variation_api(texts, label)

    return PEBackend(random_api, slow_variation, bow_embed)


# -- fixtures -----------------------------------------------------------------------------------


def private_rows() -> list[tuple[str, str]]:
    fruit = ["apple banana cherry", "grape lemon mango", "peach plum apple", "cherry mango lemon"]
    car = ["engine wheel brake", "piston gear clutch", "axle valve engine"]
    rows = [(f"{fruit[i % 4]} {CANARY}", "fruit") for i in range(80)]
    rows += [(f"{car[i % 3]} {CANARY}", "car") for i in range(40)]
    return rows


@contextmanager
def running_app(store_url: str, config: dict | None = None, **manager_kw: Any) -> Iterator[tuple[Any, Any]]:
    """(TestClient, app) whose lifespan JobManager is replaced by one built with ``manager_kw``."""
    from fastapi.testclient import TestClient

    from proxy.app import create_app
    from proxy.config import config_from_dict

    cfg = config_from_dict({"store": {"url": store_url}, **(config or {})}, env={"DPICL_ADMIN_KEY": ADMIN_KEY})
    app = create_app(cfg)
    with TestClient(app) as client:
        app.state.jobs.close()
        app.state.jobs = JobManager.create(app.state.store, app.state.budget, cfg, metrics=app.state.metrics,
                                           **manager_kw)
        try:
            yield client, app
        finally:
            app.state.jobs.close()


def make_dataset(app: Any, budget: float = 10.0) -> str:
    return app.state.store.create_dataset("words", private_rows(), budget, 1e-5).id


def wait_for(client: Any, job_id: str, states: set[str], timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = client.get(f"/admin/jobs/{job_id}", headers=AUTH).json()
        if rec["state"] in states:
            return rec
        time.sleep(0.1)
    raise AssertionError(f"job did not reach {states}; last state {rec['state']}")


def job_entries(app: Any, dataset_id: str, job_id: str) -> list:
    return [e for e in app.state.store.ledger("words") if job_id in e.reason and "label counts" not in e.reason]


PE_BODY = {"kind": "pe", "epsilon": 4.0, "iterations": 3, "population": 12, "num_samples": 30}


# -- in-process runner --------------------------------------------------------------------------


def test_pe_job_end_to_end_in_process(tmp_path):
    with running_app(f"sqlite:///{tmp_path / 's.db'}", pe_backend=tiny_pe_backend, heartbeat_interval=0.2) as (c, app):
        ds = make_dataset(app)
        r = c.post("/admin/jobs", json={**PE_BODY, "dataset": ds}, headers=AUTH)
        assert r.status_code == 201, r.text
        rec = r.json()
        job = rec["id"]
        # The full cost is in the ledger as soon as the job id is returned.
        entries = job_entries(app, ds, job)
        sigma = rec["plan"]["sigma"]
        assert sorted(e.partition for e in entries) == ["car", "fruit"]
        for e in entries:
            assert event_from_dict(e.event) == dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(sigma), 3)
        assert 0 < rec["epsilon_charged"] and rec["epsilon_job"] <= 4.0
        assert app.state.budget.spent(ds) <= 4.0
        # The spend gauge follows the reservation (the dataset was made without the API).
        gauge = f'dpicl_epsilon_spent{{dataset_id="{ds}"}} '
        line = next(x for x in c.get("/metrics", headers=AUTH).text.splitlines() if x.startswith(gauge))
        assert float(line[len(gauge):]) == pytest.approx(app.state.budget.spent(ds))
        done = wait_for(c, job, {"succeeded", "failed"})
        assert done["state"] == "succeeded", done["error"]
        assert done["progress"] == 100.0 and done["rows"] == 30
        rows = [json.loads(line) for line in c.get(f"/admin/jobs/{job}/result", headers=AUTH).text.splitlines()]
        # Rows per label follow the dataset's DP label counts (N(0, 20^2) noise, not seeded by the
        # job), so a label may rightly get no rows; the split must be exactly the one they imply.
        expected = {lab: n for lab, n in allocate(done["label_counts"], 30).items() if n > 0}
        assert "fruit" in expected
        assert len(rows) == 30 and collections.Counter(r["label"] for r in rows) == expected
        listing = c.get("/admin/jobs", headers=AUTH)
        assert [j["id"] for j in listing.json()["data"]] == [job]
        for body in (listing.text, json.dumps(done)):
            assert CANARY not in body
        assert c.get(f"/admin/jobs/{job}/result?part=adapter", headers=AUTH).status_code == 400
        assert c.post(f"/admin/jobs/{job}/cancel", headers=AUTH).status_code == 409


def test_api_errors_are_openai_style(tmp_path):
    with running_app(f"sqlite:///{tmp_path / 's.db'}", pe_backend=tiny_pe_backend) as (c, app):
        ds = make_dataset(app, budget=1.0)
        assert c.get("/admin/jobs").status_code == 401
        bad = c.post("/admin/jobs", json={"kind": "pe", "dataset": ds, "iterations": 0}, headers=AUTH)
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        assert c.post("/admin/jobs", json={"kind": "x", "dataset": ds}, headers=AUTH).status_code == 400
        missing = c.post("/admin/jobs", json={**PE_BODY, "dataset": "nope"}, headers=AUTH)
        assert missing.status_code == 404
        assert c.get("/admin/jobs/job-unknown", headers=AUTH).status_code == 404
        # Over budget: refused cleanly, nothing charged for the job, no job recorded.
        over = c.post("/admin/jobs", json={**PE_BODY, "dataset": ds, "epsilon": 3.0}, headers=AUTH)
        assert over.status_code == 402, over.text
        err = over.json()["error"]
        assert err["code"] == "budget_exceeded" and "remains" in err["message"]
        assert all("(pe)" not in e.reason for e in app.state.store.ledger("words"))
        assert c.get("/admin/jobs", headers=AUTH).json()["data"] == []
        # A job that fits the remaining budget still runs.
        ok = c.post("/admin/jobs", json={**PE_BODY, "dataset": ds, "epsilon": 0.6}, headers=AUTH)
        assert ok.status_code == 201, ok.text
        assert c.get(f"/admin/jobs/{ok.json()['id']}/result", headers=AUTH).status_code in (200, 409)
        assert app.state.budget.spent(ds) <= 1.0


def test_dpsgd_refuses_a_provider_model_before_charging(tmp_path):
    listed = {"model_list": [{"model_name": "remote", "litellm_params": {"model": "openai/x"}}]}
    with running_app(f"sqlite:///{tmp_path / 's.db'}", config=listed, pe_backend=tiny_pe_backend) as (c, app):
        ds = make_dataset(app)
        r = c.post("/admin/jobs", json={"kind": "dpsgd", "dataset": ds, "model": "remote"}, headers=AUTH)
        assert r.status_code == 400 and "local model" in r.json()["error"]["message"]
        assert all("job-" not in e.reason or "label counts" in e.reason for e in app.state.store.ledger("words"))
        # PE only calls the model, so a provider model is accepted there.
        ok = c.post("/admin/jobs", json={**PE_BODY, "dataset": ds, "model": "remote"}, headers=AUTH)
        assert ok.status_code == 201, ok.text


def test_cancel_a_running_job_keeps_the_cost_spent(tmp_path):
    with running_app(f"sqlite:///{tmp_path / 's.db'}", pe_backend=slow_pe_backend, heartbeat_interval=0.2) as (c, app):
        ds = make_dataset(app)
        job = c.post("/admin/jobs", json={**PE_BODY, "dataset": ds, "iterations": 30}, headers=AUTH).json()["id"]
        wait_for(c, job, {"running"})
        spent = app.state.budget.spent(ds)
        assert c.post(f"/admin/jobs/{job}/cancel", headers=AUTH).status_code == 200
        rec = wait_for(c, job, {"cancelled", "failed", "succeeded"}, timeout=20)
        assert rec["state"] == "cancelled" and rec["progress"] < 100
        assert c.get(f"/admin/jobs/{job}/result", headers=AUTH).status_code == 409
        assert len(job_entries(app, ds, job)) == 2 and app.state.budget.spent(ds) == spent


def test_queued_job_is_cancelled_before_it_runs(tmp_path):
    with running_app(f"sqlite:///{tmp_path / 's.db'}", pe_backend=slow_pe_backend, heartbeat_interval=0.2) as (c, app):
        ds = make_dataset(app)
        first = c.post("/admin/jobs", json={**PE_BODY, "dataset": ds, "iterations": 30}, headers=AUTH).json()["id"]
        second = c.post("/admin/jobs", json={**PE_BODY, "dataset": ds}, headers=AUTH).json()["id"]
        assert c.get(f"/admin/jobs/{second}", headers=AUTH).json()["state"] == "queued"  # one worker thread
        assert c.post(f"/admin/jobs/{second}/cancel", headers=AUTH).json()["state"] == "cancelled"
        c.post(f"/admin/jobs/{first}/cancel", headers=AUTH)
        assert wait_for(c, first, {"cancelled"}, timeout=20)["state"] == "cancelled"
        assert c.get(f"/admin/jobs/{second}", headers=AUTH).json()["started_at"] is None


def save_tiny_model(path: Path) -> Path:
    import copy

    from tests.tiny_model import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer()
    copy.deepcopy(model).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_dpsgd_job_end_to_end_in_process(tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny")
    with running_app(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=0.2) as (c, app):
        ds = make_dataset(app)
        body = {"kind": "dpsgd", "dataset": ds, "epsilon": 6.0, "model": str(model_dir), "steps": 3,
                "batch_size": 8, "num_samples": 4, "max_new_tokens": 5, "max_length": 16,
                "prompt": {"instruction": "Write words.", "input_prefix": "Words:", "label_prefix": "Topic:"}}
        r = c.post("/admin/jobs", json=body, headers=AUTH)
        assert r.status_code == 201, r.text
        rec = r.json()
        (entry,) = job_entries(app, ds, rec["id"])
        plan = rec["plan"]
        assert entry.partition == "*"
        assert event_from_dict(entry.event) == dpa.SelfComposedDpEvent(
            dpa.PoissonSampledDpEvent(plan["q"], dpa.GaussianDpEvent(plan["noise_multiplier"])), 3)
        # q comes from the DP counts (a negative noisy count counts as 0), not the exact 120 rows.
        assert plan["q"] == pytest.approx(8 / sum(max(0.0, c) for c in rec["label_counts"].values()))
        done = wait_for(c, rec["id"], {"succeeded", "failed"}, timeout=120)
        assert done["state"] == "succeeded", done["error"]
        adapter = c.get(f"/admin/jobs/{rec['id']}/result?part=adapter", headers=AUTH)
        assert adapter.status_code == 200
        with tarfile.open(fileobj=io.BytesIO(adapter.content), mode="r:gz") as tar:
            assert "adapter/adapter_config.json" in tar.getnames()
        synthetic = c.get(f"/admin/jobs/{rec['id']}/result", headers=AUTH).text
        assert all(json.loads(line)["label"] in ("fruit", "car") for line in synthetic.splitlines())


# -- Redis queue with dpicl worker subprocesses -----------------------------------------------------


def start_worker(redis_url: str, store_url: str, backend: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), LITELLM_LOCAL_MODEL_COST_MAP="True")
    env.pop("DPICL_CONFIG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "worker", "--redis", redis_url, "--store", store_url,
         "--pe-backend", backend, "--heartbeat", "0.2"],
        cwd=str(REPO), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )


def stop_worker(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_pe_job_through_redis_queue_and_worker_process(tmp_path, redis_url):
    store_url = f"sqlite:///{tmp_path / 's.db'}"
    worker = start_worker(redis_url, store_url, "tests.test_jobs:tiny_pe_backend")
    try:
        with running_app(store_url, redis_url=redis_url, stale_after=30) as (c, app):
            ds = make_dataset(app)
            rec = c.post("/admin/jobs", json={**PE_BODY, "dataset": ds}, headers=AUTH).json()
            assert rec["runner"] == "rq"
            done = wait_for(c, rec["id"], {"succeeded", "failed"}, timeout=90)
            assert done["state"] == "succeeded", done["error"]
            assert done["worker"].endswith(f":{worker.pid}")  # ran by the dpicl worker subprocess
            assert len(c.get(f"/admin/jobs/{rec['id']}/result", headers=AUTH).text.splitlines()) == 30
    finally:
        stop_worker(worker)


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.parametrize("what", ["whole worker", "work horse"])
def test_worker_killed_mid_job_ends_failed_with_cost_spent(tmp_path, redis_url, what):
    store_url = f"sqlite:///{tmp_path / 's.db'}"
    worker = start_worker(redis_url, store_url, "tests.test_jobs:slow_pe_backend")
    try:
        with running_app(store_url, redis_url=redis_url, stale_after=2.0) as (c, app):
            ds = make_dataset(app)
            rec = c.post("/admin/jobs", json={**PE_BODY, "dataset": ds, "iterations": 50}, headers=AUTH).json()
            wait_for(c, rec["id"], {"running"}, timeout=60)
            spent = app.state.budget.spent(ds)
            horses = _children(worker.pid)
            assert horses, "the RQ worker has no work horse"
            if what == "whole worker":
                # Parent and work horse (RQ puts the horse in its own session), as if the machine
                # died: nobody reports anything, only the missing heartbeats tell.
                os.killpg(worker.pid, signal.SIGKILL)
                for pid in horses:
                    os.kill(pid, signal.SIGKILL)
                worker.wait()
            else:
                os.kill(horses[0], signal.SIGKILL)  # RQ's parent notices the dead horse
            done = wait_for(c, rec["id"], {"failed", "succeeded", "cancelled"}, timeout=30)
            assert done["state"] == "failed"
            assert "privacy cost stays spent" in done["error"]
            # Either the heartbeat went stale, or RQ saw its work horse die and told us at once.
            assert ("stopped responding" if what == "whole worker" else "died mid-job") in done["error"]
            assert len(job_entries(app, ds, rec["id"])) == 2
            assert app.state.budget.spent(ds) == spent
    finally:
        if worker.poll() is None:
            stop_worker(worker)


def test_seed_only_on_public_data_and_never_shown(tmp_path):
    """Issue 10: a seed would make the noise on private data reproducible; jobs refuse it there,
    and no job view ever shows a seed."""
    with running_app(f"sqlite:///{tmp_path / 's.db'}", pe_backend=tiny_pe_backend) as (c, app):
        ds = make_dataset(app)
        r = c.post("/admin/jobs", json={**PE_BODY, "dataset": ds, "seed": 7}, headers=AUTH)
        assert r.status_code == 400 and "seed" in r.json()["error"]["message"]
        assert c.get("/admin/jobs", headers=AUTH).json()["data"] == []
        pub = app.state.store.create_dataset("open", private_rows(), 10.0, 1e-5, public=True).id
        ok = c.post("/admin/jobs", json={**PE_BODY, "dataset": pub, "seed": 7}, headers=AUTH)
        assert ok.status_code == 201, ok.text
        plain = c.post("/admin/jobs", json={**PE_BODY, "dataset": ds}, headers=AUTH).json()
        for view in (ok.json(), c.get(f"/admin/jobs/{ok.json()['id']}", headers=AUTH).json(),
                     *c.get("/admin/jobs", headers=AUTH).json()["data"]):
            assert "seed" not in view and "seed" not in view["params"]
        # Each label's fate is stated, from the noisy counts.
        assert set(plain["label_decisions"]) == {"car", "fruit"}
        assert all(v["decision"] in ("private", "skip") for v in plain["label_decisions"].values())
        wait_for(c, ok.json()["id"], {"succeeded", "failed"})
        wait_for(c, plain["id"], {"succeeded", "failed"})


# -- what this install can run --------------------------------------------------------------------


def test_a_kind_this_install_cannot_run_is_refused_before_anything_is_charged(tmp_path, monkeypatch):
    """An image without the 'train' extra used to reserve the job's cost, then fail with
    ModuleNotFoundError: now 501 names the extra and the ledger stays empty (not even the counts)."""
    from proxy.jobs import requirements

    monkeypatch.setattr(requirements, "module_available", lambda name: name not in ("opacus", "sentence_transformers"))
    with running_app(f"sqlite:///{tmp_path / 's.db'}") as (c, app):  # the default PE backend
        ds = make_dataset(app)
        for body in ({"kind": "dpsgd", "dataset": ds}, {**PE_BODY, "dataset": ds}):
            r = c.post("/admin/jobs", json=body, headers=AUTH)
            assert r.status_code == 501, r.text
            err = r.json()["error"]
            assert err["code"] == "missing_extra" and "dpicl[train]" in err["message"], err
            assert "nothing was charged" in err["message"] and "\n" not in err["message"]
        assert app.state.store.ledger("words") == []
        assert c.get("/admin/jobs", headers=AUTH).json()["data"] == []
    # A custom PE backend brings its own dependencies: nothing to check, the job is accepted.
    with running_app(f"sqlite:///{tmp_path / 't.db'}", pe_backend=tiny_pe_backend) as (c, app):
        ok = c.post("/admin/jobs", json={**PE_BODY, "dataset": make_dataset(app)}, headers=AUTH)
        assert ok.status_code == 201, ok.text


def test_a_missing_module_is_named_in_the_job_error():
    from proxy.jobs.execute import _safe_error

    msg = _safe_error(ModuleNotFoundError(f"No module named 'opacus' ({CANARY})", name="opacus"))
    assert "module opacus is not installed" in msg and CANARY not in msg
    # Only a module-shaped name is echoed; anything else stays withheld.
    assert CANARY not in _safe_error(ImportError("x", name=f"{CANARY} and more"))
