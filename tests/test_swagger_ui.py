"""``/docs`` (FastAPI's Swagger UI) and the public ``/openapi.json`` it reads: the document holds no
data (the same whatever the configuration and the stored datasets, tasks and keys), and in a real
headless Chromium an admin authorises with the key in the page and runs an admin call.
"""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

from proxy.api.openapi import build_openapi
from proxy.app import create_app
from proxy.config import config_from_dict
from tests.test_app_support import (  # noqa: F401 - fixtures
    ADMIN_KEY, CANARY, LiveServer, admin_headers, dataset_rows, fake_upstream, jsonl_bytes, make_config, task_spec,
    upload,
)

CHROMIUM = os.environ.get("DPICL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
SECRET_NAMES = ("hidden-dataset-name", "hidden-task-name", "hidden-key-name")


@pytest.fixture
def live(tmp_path, fake_upstream):
    task = task_spec("hidden-task-name", "hidden-dataset-name")
    cfg = make_config(f"sqlite:///{tmp_path}/s.db", fake_upstream.base_url, None, tasks=[task], client_tasks=["*"])
    with LiveServer(create_app(cfg)) as srv:
        with httpx.Client(base_url=srv.url, timeout=60, headers=admin_headers()) as http:
            assert upload(http, "hidden-dataset-name", jsonl_bytes(dataset_rows(5))).status_code == 201
            assert http.post("/admin/keys", json={"name": "hidden-key-name", "tasks": ["*"]}).status_code == 201
        yield srv


def test_public_openapi_document_holds_no_data(live):
    # Public (the old server answered 404 here), identical to the admin copy, and identical to the
    # document of an app with no tasks, no keys and nothing stored: it cannot carry any data.
    public = httpx.get(live.url + "/openapi.json", timeout=60)
    assert public.status_code == 200
    assert public.json() == httpx.get(live.url + "/admin/openapi.json", headers=admin_headers(), timeout=60).json()
    bare = build_openapi(create_app(config_from_dict({}, {})))
    assert public.json() == bare
    for secret in (*SECRET_NAMES, CANARY, ADMIN_KEY):
        assert secret not in public.text
    assert public.json()["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}


def test_docs_page_is_served_offline(live):
    page = httpx.get(live.url + "/docs", timeout=60)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in page.text and "persistAuthorization" in page.text
    assert page.headers["x-frame-options"] == "DENY"
    # Swagger UI's script comes from this server (the copy litellm ships), not from a CDN.
    assert '"/docs/swagger-ui-bundle.js"' in page.text or "'/docs/swagger-ui-bundle.js'" in page.text
    js = httpx.get(live.url + "/docs/swagger-ui-bundle.js", timeout=60)
    assert js.status_code == 200 and "SwaggerUIBundle" in js.text[:2000]
    assert httpx.get(live.url + "/docs/..%2Fopenapi.json", timeout=60).status_code == 404


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium is not installed")
def test_swagger_ui_authorize_and_try_an_admin_call(live):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(live.url + "/docs")
            block = page.locator(".opblock-get:has(.opblock-summary-path[data-path='/admin/datasets'])").first
            block.locator(".opblock-summary").click()
            block.locator(".try-out__btn").click()
            block.locator(".execute").click()
            status = block.locator(".live-responses-table tbody .response-col_status").first
            assert status.inner_text().strip().startswith("401")  # not authorised yet
            page.click(".auth-wrapper .authorize")
            page.fill(".auth-container input", ADMIN_KEY)
            page.click(".auth-btn-wrapper .authorize")
            page.click(".auth-btn-wrapper .btn-done")
            block.locator(".execute").click()
            page.wait_for_function(
                "() => [...document.querySelectorAll('.live-responses-table tbody .response-col_status')]"
                ".some(e => e.innerText.trim().startsWith('200'))")
            body = block.locator(".live-responses-table tbody .response-col_description").first.inner_text()
            assert "hidden-dataset-name" in body and CANARY not in body  # the listing, never a row
            assert page.evaluate("localStorage.length") == 0  # the key stays in the page only
            assert not errors, errors
        finally:
            browser.close()
