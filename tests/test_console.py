"""The admin console (/admin/ui) in a real headless browser: Debian's chromium driven by Playwright.

Sign in with the admin key, upload a dataset, set its budget, create and warm a task and watch it
finish, see the budget chart gain a point; the page never shows a private row and the browser
reports no console errors. Skipped when chromium or the playwright package is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from proxy.app import create_app
from tests.test_app_support import (  # noqa: F401 - fixtures
    ADMIN_KEY, CANARY, LABELS, LiveServer, dataset_rows, fake_upstream, jsonl_bytes, make_config, tiny_model_dir,
)

CHROMIUM = os.environ.get("DPICL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium is not installed")


@pytest.fixture
def browser_page():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        # --no-sandbox: CI runs as root, where chromium's sandbox cannot start.
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("console", lambda msg: errors.append(f"{msg.text} {msg.location.get('url', '')}")
                if msg.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.set_default_timeout(60_000)
        try:
            yield page, errors
        finally:
            browser.close()


@pytest.fixture
def live(tmp_path, fake_upstream, tiny_model_dir):
    cfg = make_config(f"sqlite:///{tmp_path}/s.db", fake_upstream.base_url, tiny_model_dir, client_tasks=["*"])
    app = create_app(cfg)
    with LiveServer(app) as srv:
        srv.paths = {getattr(r, "path", "") for r in app.routes}
        yield srv, tmp_path


def _go(page, url: str, name: str) -> None:
    page.goto(f"{url}/admin/ui/#{name}")
    page.wait_for_selector(f'#page[data-page="{name}"]')


def test_console_sign_in_upload_budget_warm_and_chart(live, browser_page):
    srv, tmp = live
    page, errors = browser_page
    rows = tmp / "rows.jsonl"
    rows.write_bytes(jsonl_bytes(dataset_rows(20)))

    page.goto(f"{srv.url}/admin/ui")  # redirects to /admin/ui/
    page.fill("#admin-key", "wrong-key")
    page.click("#signin-form button")
    page.wait_for_selector("#signin-error:has-text('refused')")
    errors.clear()  # the refused sign-in is an expected 401 in the console

    page.fill("#admin-key", ADMIN_KEY)
    page.click("#signin-form button")
    page.wait_for_selector('#page[data-page="datasets"]')
    assert page.evaluate("sessionStorage.getItem('dpicl-admin-key')") == ADMIN_KEY
    assert page.evaluate("localStorage.length") == 0  # held for this tab's session only

    page.set_input_files("#upload-form input[name=file]", str(rows))
    page.fill("#upload-form input[name=name]", "qs")
    page.fill("#upload-form input[name=labels]", ",".join(LABELS))
    page.click("#upload-form button")
    page.wait_for_selector("#page table td:has-text('qs')")
    assert "60" in page.inner_text("#page table")  # row count

    _go(page, srv.url, "budgets")
    assert page.get_attribute('[data-chart="qs"]', "data-points") == "0"
    page.select_option("#budget-form select[name=name]", "qs")
    page.fill("#budget-form input[name=epsilon]", "7")
    page.click("#budget-form button")
    page.wait_for_selector(".card[data-name='qs'] .big:has-text('/ 7.000')")

    _go(page, srv.url, "tasks")
    for field, value in [("name", "ui-task"), ("dataset", "qs"), ("instruction", "Classify the question."),
                         ("input_prefix", "Question:"), ("label_prefix", "Answer type:"), ("labels", "LOC,NUM"),
                         ("max_tokens", "3"), ("num_subsets", "2")]:
        page.fill(f"#task-form input[name={field}]", value)
    page.select_option("#task-form select[name=mode]", "fixed")
    page.click("#task-form button")
    page.wait_for_selector("[data-warm='ui-task']")
    page.click("[data-warm='ui-task']")
    # A server with background warm-ups moves to the warm-ups page and shows live progress;
    # one that warms within the request reports the charge on the tasks page.
    page.wait_for_function("""() => location.hash === '#warmups'
        ? !!document.querySelector('[data-state="done"]')
        : /generated, charged/.test(document.getElementById('status').textContent)""", timeout=120_000)

    _go(page, srv.url, "tasks")
    page.wait_for_selector(".demo")
    _go(page, srv.url, "budgets")
    page.wait_for_selector('[data-chart="qs"] canvas')
    assert int(page.get_attribute('[data-chart="qs"]', "data-points")) >= 1  # the chart gained a point
    spent = page.inner_text(".card[data-name='qs'] .big")
    assert re.search(r"ε 0\.\d+ / 7\.000|ε [1-6]\.\d+ / 7\.000", spent), spent

    _go(page, srv.url, "keys")
    page.fill("#key-form input[name=name]", "ui-app")
    page.fill("#key-form input[name=tasks]", "ui-task")
    page.click("#key-form button")
    page.wait_for_selector("#new-key .secret")
    assert page.inner_text("#new-key .secret").startswith("dpk-")

    seen = []
    for name in ("datasets", "budgets", "audit", "tasks", "warmups", "jobs", "keys"):
        _go(page, srv.url, name)
        seen.append(page.content())
    assert "dataset.upload" in seen[2] and "budget.set" in seen[2]  # the audit log
    assert all(CANARY not in html for html in seen)  # no private row is ever displayed
    if "/admin/warmups" not in srv.paths:  # a server without background warm-ups answers 404 there
        errors = [e for e in errors if not e.endswith("/admin/warmups") or "404" not in e]
    assert errors == []

    page.click("#signout")
    assert page.evaluate("sessionStorage.getItem('dpicl-admin-key')") is None
    assert page.is_visible("#signin")


def test_console_partial_pages_budget_history_steps_names_and_defaults(live, browser_page):
    """Issue 21 section 4: a task whose dataset is gone is a warning on its row (the page still
    renders); the chart's budget line follows the budget's history and one warm-up's charges (one
    timestamp) still draw a visible point; jobs show dataset names; the task form's defaults are
    the API's."""
    import httpx

    from proxy.task_config import GenerationSettings, TaskConfig
    from tests.test_app_support import admin_headers, task_spec, upload

    from tests.test_serving_clusters import FakeEmbed

    srv, _ = live
    page, errors = browser_page
    with httpx.Client(base_url=srv.url, timeout=120, headers=admin_headers()) as http:
        FakeEmbed(srv.app, "qs").install()  # a cheap deterministic embedder for the clustered task
        qs = upload(http, "qs", jsonl_bytes(dataset_rows(10)), epsilon="5").json()
        assert http.put("/admin/budget/qs", json={"epsilon": 7}).status_code == 200  # budget history: 5, then 7
        clustered = task_spec("clu", "qs", generation={"mode": "fixed", "num_subsets": 2, "shots_per_subset": 1,
                                                       "max_tokens": 3, "top_k": 8, "clusters": 2})
        assert http.post("/admin/tasks", json=clustered).status_code == 201
        warmed = http.post("/admin/tasks/clu/demos", json={"wait": True})
        assert warmed.status_code == 200 and warmed.json()["state"] == "done", warmed.text
        gone = upload(http, "gone", jsonl_bytes(dataset_rows(5))).json()
        assert http.post("/admin/tasks", json=task_spec("ok-task", "qs")).status_code == 201
        assert http.post("/admin/tasks", json=task_spec("broken", "gone")).status_code == 201
        assert http.delete(f"/admin/datasets/{gone['id']}").status_code == 200  # its task now points at nothing
        warmed = http.post("/admin/tasks/ok-task/demos", json={"wait": True})
        assert warmed.status_code == 200 and warmed.json()["state"] == "done", warmed.text
        partitions = http.get("/admin/budget/qs").json()["partitions"]
        assert any("#" in p for p in partitions)  # cluster partitions label#j were charged

    page.goto(f"{srv.url}/admin/ui")
    page.fill("#admin-key", ADMIN_KEY)
    page.click("#signin-form button")
    page.wait_for_selector('#page[data-page="datasets"]')

    _go(page, srv.url, "tasks")  # the datasets page must not stay on screen
    assert page.is_visible("[data-warning='broken']")  # the bad row is a warning on that row
    rows = page.inner_text("#page table")
    assert "ok-task" in rows and "broken" in rows and page.query_selector("[data-page-error]") is None
    assert page.query_selector("[data-warning='ok-task']") is None

    task, gen = TaskConfig.model_fields, GenerationSettings.model_fields
    form = "#task-form "
    assert page.input_value(form + "input[name=input_prefix]") == task["input_prefix"].default
    assert page.input_value(form + "input[name=label_prefix]") == task["label_prefix"].default
    assert float(page.input_value(form + "input[name=epsilon]")) == task["epsilon"].default
    assert page.input_value(form + "select[name=mode]") == gen["mode"].default
    assert int(page.input_value(form + "input[name=max_tokens]")) == gen["max_tokens"].default
    assert int(page.input_value(form + "input[name=num_subsets]")) == gen["num_subsets"].default
    assert int(page.input_value(form + "input[name=clusters]")) == gen["clusters"].default  # 0: off
    assert page.input_value(form + "select[name=clustering]") == gen["clustering"].default

    _go(page, srv.url, "budgets")
    page.wait_for_selector('[data-chart="qs"] canvas')
    box = '[data-chart="qs"]'
    assert page.get_attribute(box, "data-budgets") == "5.0,7.0" or page.get_attribute(box, "data-budgets") == "5,7"
    assert page.get_attribute(box, "data-shape") == "steps"
    drawn = page.evaluate("""() => charts.map((u) => ({ span: u.scales.x.max - u.scales.x.min,
        spent: u.data[1], budget: u.data[2] }))""")
    assert len(drawn) == 1 and drawn[0]["span"] > 0  # not an empty box
    assert max(drawn[0]["spent"]) > 0 and drawn[0]["spent"][0] == 0  # from zero up to the warm-up's charge
    assert drawn[0]["budget"][-1] == 7 and 5 in drawn[0]["budget"]  # the budget line steps from 5 to 7
    # The per-partition table: every partition of GET /admin/budget with its spent epsilon, label#j included.
    shown = page.eval_on_selector_all('[data-partitions="qs"] tbody tr',
                                      "rows => rows.map((r) => [...r.cells].map((c) => c.textContent))")
    assert shown == [[p, f"{v:.3f}"] for p, v in partitions.items()] and any("#" in p for p, _ in shown)

    # Jobs show dataset names (a job list answered by the route, as a server with jobs would).
    job = {"id": "job_1", "kind": "pe", "state": "succeeded", "progress": 100, "dataset_id": qs["id"],
           "epsilon_charged": 1.0, "rows": 10, "created_at": 1.0}
    old = dict(job, id="job_2", dataset_id="ds_0000000000000000")
    page.route("**/admin/jobs", lambda route: route.fulfill(
        status=200, content_type="application/json", body=json.dumps({"object": "list", "data": [job, old]})))
    _go(page, srv.url, "jobs")
    assert page.inner_text("[data-job-dataset='job_1']") == "qs v1"
    assert "deleted" in page.inner_text("[data-job-dataset='job_2']")
    # The broken task's 409 is the expected answer the row's warning shows; nothing else failed.
    assert [e for e in errors if "/admin/tasks/broken/demos" not in e] == [], errors
