"""What a caller without the admin key can see (issue 20, section 3): /metrics needs the admin key
or the scrape token (its per-dataset budgets and route latencies, such as a warm-up's duration, are
admin-only); a key scoped to some tasks cannot tell which other task names exist; an upstream's
error page (HTML, a traceback) never reaches the client, on any upstream kind."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from proxy.app import create_app
from proxy.config import ConfigError
from proxy.devtools.fake_upstream import FakeOptions, FakeUpstream
from proxy.upstreams import UpstreamError
from tests.test_app_support import (  # noqa: F401 - fixtures
    ADMIN_KEY, CLIENT_KEY, FAKE_MODEL, LiveServer, admin_headers, assert_openai_error, dataset_rows, fake_upstream,
    jsonl_bytes, make_config, task_spec, upload,
)
from tests.test_upstream_faults import _attempt, make_upstream
from tests.test_upstreams import KINDS, run

CLIENT = {"Authorization": f"Bearer {CLIENT_KEY}"}
SCRAPE = "scrape-token-for-prometheus"


# -- /metrics -------------------------------------------------------------------------------------------
def test_metrics_need_the_admin_key_or_the_scrape_token(tmp_path: Any, fake_upstream: Any) -> None:
    cfg = make_config(f"sqlite:///{tmp_path}/s.db", fake_upstream.base_url, None, client_tasks=["*"],
                      extra_server={"metrics_token_env": "DPICL_SCRAPE"}, extra_env={"DPICL_SCRAPE": SCRAPE})
    with LiveServer(create_app(cfg)) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        ds = upload(http, "d", jsonl_bytes(dataset_rows(3))).json()
        # Per-dataset figures exist (the upload set the budget gauge) ...
        for key in (SCRAPE, ADMIN_KEY):
            r = http.get("/metrics", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            assert f'dpicl_epsilon_budget{{dataset_id="{ds["id"]}"}}' in r.text
            assert "dpicl_request_seconds_bucket" in r.text
        # ... and nobody else reads them: no key, a wrong key, a client key, the token elsewhere.
        for headers, status in (({}, 401), ({"Authorization": "Bearer nope"}, 401), (CLIENT, 403),
                                ({"x-api-key": SCRAPE}, 401), ({"Authorization": SCRAPE}, 401)):
            r = http.get("/metrics", headers=headers)
            assert_openai_error(r, status)
            assert "dpicl_" not in r.text and ds["id"] not in r.text
        assert_openai_error(http.get("/admin/datasets", headers={"Authorization": f"Bearer {SCRAPE}"}), 401)
        # Liveness and readiness stay public.
        assert http.get("/health/liveness").status_code == 200
        assert http.get("/health/readiness").status_code == 200


def test_metrics_without_an_admin_key_or_token_are_closed(tmp_path: Any, fake_upstream: Any) -> None:
    cfg = make_config(f"sqlite:///{tmp_path}/s.db", fake_upstream.base_url, None, admin=False)
    with LiveServer(create_app(cfg)) as srv:
        err = assert_openai_error(httpx.get(srv.url + "/metrics", headers={"Authorization": "Bearer x"}), 401)
        assert err["code"] == "metrics_disabled" and "metrics_token_env" in err["message"]


def test_scrape_token_comes_from_the_environment(fake_upstream: Any) -> None:
    with pytest.raises(ConfigError, match="DPICL_SCRAPE is not set"):
        make_config("sqlite:///unused.db", fake_upstream.base_url, None,
                    extra_server={"metrics_token_env": "DPICL_SCRAPE"})


# -- task names -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_scoped_key_cannot_tell_which_task_names_exist(tmp_path: Any, fake_upstream: Any, route: str,
                                                         stream: bool) -> None:
    specs = [task_spec("allowed", "d", on_missing="error"), task_spec("other", "d", on_missing="error")]
    cfg = make_config(f"sqlite:///{tmp_path}/s.db", fake_upstream.base_url, None, tasks=specs,
                      client_tasks=["allowed"])
    with LiveServer(create_app(cfg)) as srv, httpx.Client(base_url=srv.url, timeout=30, headers=CLIENT) as http:
        def ask(model: str) -> tuple[int, str, dict[str, str]]:
            body: dict[str, Any] = {"model": model, "stream": stream}
            if route.endswith("chat/completions"):
                body["messages"] = [{"role": "user", "content": "x"}]
            else:
                body["prompt"] = "Question: x\nAnswer type:"
            r = http.post(route, json=body)
            headers = {k: v for k, v in r.headers.items() if k not in ("date", "content-length")}
            return r.status_code, r.text.replace(model, "NAME"), headers

        real, absent = ask("other"), ask("no-such-task")
        assert real == absent
        assert real[0] == 404 and "model_not_found" in real[1]


# -- upstream error pages -------------------------------------------------------------------------------
SECRETS = ("Traceback", "<html", "<pre", "db_password", "credentials.yaml", "handlers.py")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("status", [500, 400])
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_error_pages_are_withheld(kind: str, status: int, stream: bool) -> None:
    with FakeUpstream(FakeOptions(fault="html_error", fail_status=status)) as fake:
        with pytest.raises(UpstreamError) as info:
            # A generous timeout: the first litellm call of a busy machine can take seconds, and a
            # timeout (504) is not what this test is about.
            run(_attempt(make_upstream(kind, fake.base_url, timeout=60.0), stream))
    err = info.value
    assert err.status == (502 if status >= 500 else status)
    assert not any(s in err.message for s in SECRETS), err.message
    assert str(status) in err.message  # what happened is still said: the upstream's status


def test_upstream_error_page_never_reaches_the_client(tmp_path: Any) -> None:
    with FakeUpstream(FakeOptions(fault="html_error", fail_status=500)) as fake:
        cfg = make_config(f"sqlite:///{tmp_path}/s.db", fake.base_url, None, client_tasks=["*"],
                          extra_server={"retries": 0})
        with LiveServer(create_app(cfg)) as srv:
            for stream in (False, True):
                r = httpx.post(srv.url + "/v1/chat/completions", headers=CLIENT, timeout=30, json={
                    "model": FAKE_MODEL, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
                err = assert_openai_error(r, 502)
                assert not any(s in r.text for s in SECRETS), err
