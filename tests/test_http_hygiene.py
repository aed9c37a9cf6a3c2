"""Input and HTTP hygiene on a live server: a body that does not arrive in time is cut off with 408,
a client that goes away is logged and counted as 499 (not 500), admin bodies are strict (JSON types
must match, budgets are finite and capped), and the admin key is read from the Authorization header
only."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import httpx
import pytest

from proxy.api.schemas import MAX_BUDGET_EPSILON
from proxy.app import create_app
from tests.test_app_support import (  # noqa: F401 - fixtures
    ADMIN_KEY, CLIENT_KEY, FAKE_MODEL, LiveServer, admin_headers, assert_openai_error, capture_logs,
    dataset_rows, fake_upstream, jsonl_bytes, make_config, task_spec, upload,
)

CLIENT = {"Authorization": f"Bearer {CLIENT_KEY}"}


@pytest.fixture
def live(tmp_path: Any, fake_upstream: Any) -> Any:
    cfg = make_config(f"sqlite:///{tmp_path}/s.db", fake_upstream.base_url, None, client_tasks=["*"],
                      extra_server={"body_timeout": 0.5})
    with LiveServer(create_app(cfg)) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        yield srv, http


def _partial_request(port: int, path: str, declared: int, sent: bytes, auth: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {auth}\r\nContent-Length: {declared}\r\n\r\n").encode()
    sock.sendall(head + sent)
    return sock


def _metric(http: httpx.Client, status: str) -> float:
    total = 0.0
    for line in http.get("/metrics", headers=admin_headers()).text.splitlines():
        if line.startswith("dpicl_requests_total{") and f'status="{status}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_slow_body_is_cut_off_with_408(live: Any) -> None:
    srv, http = live
    sock = _partial_request(srv.port, "/v1/chat/completions", 100, b'{"model":', CLIENT_KEY)
    try:
        raw = b""
        while b"\r\n\r\n" not in raw or not raw.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)  # the server answers on its own: the client never sends the rest
            if not chunk:
                break
            raw += chunk
    finally:
        sock.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), raw[:200]
    assert b"connection: close" in head.lower()
    err = json.loads(body)["error"]
    assert err["code"] == "body_timeout" and "did not arrive" in err["message"]
    assert _metric(http, "408") == 1


def test_client_disconnect_is_logged_as_499_not_500(live: Any) -> None:
    srv, http = live
    with capture_logs() as logs:
        sock = _partial_request(srv.port, "/v1/chat/completions", 100, b'{"model":', CLIENT_KEY)
        sock.close()  # the client gives up half-way through its body
        deadline = time.monotonic() + 10
        while _metric(http, "499") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert _metric(http, "499") == 1 and _metric(http, "500") == 0
    lines = [json.loads(line) for line in logs.lines if line.startswith("{")]
    assert any(r.get("event") == "request" and r.get("status") == 499 for r in lines)
    assert not any(r.get("level") == "error" for r in lines), lines


def test_admin_bodies_are_strict(live: Any) -> None:
    _, http = live
    http.headers.update(admin_headers())
    ds = upload(http, "d", jsonl_bytes(dataset_rows(5))).json()
    url = f"/admin/datasets/{ds['id']}/budget"
    for bad in ({"epsilon": "5"}, {"epsilon": True}, {"epsilon": 1e308}, {"epsilon": MAX_BUDGET_EPSILON * 1.01},
                {"epsilon": 5, "delta": "0.1"}, {"epsilon": 5, "delta": False}):
        err = assert_openai_error(http.put(url, json=bad), 400)
        assert err["code"] == "invalid_request"
    assert http.put(url, json={"epsilon": MAX_BUDGET_EPSILON}).json()["budget_epsilon"] == MAX_BUDGET_EPSILON
    assert http.put(url, json={"epsilon": 5}).status_code == 200  # an integer is a number
    spec = task_spec("t", "d")
    bad_task = {**spec, "generation": {**spec["generation"], "num_subsets": "2"}}
    assert_openai_error(http.post("/admin/tasks", json=bad_task), 400)
    assert_openai_error(http.post("/admin/tasks", json={**spec, "shots": True}), 400)
    assert http.post("/admin/tasks", json=spec).status_code == 201
    err = assert_openai_error(http.post("/admin/tasks/t/demos", json={"dry_run": "yes"}), 400)
    assert "dry_run" in err["message"]


def test_stream_flag_must_be_a_boolean(live: Any) -> None:
    _, http = live
    body = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}]}
    for value in ("yes", 1, "true"):
        err = assert_openai_error(http.post("/v1/chat/completions", json={**body, "stream": value}, headers=CLIENT), 400)
        assert err["param"] == "stream"
    assert http.post("/v1/chat/completions", json={**body, "stream": False}, headers=CLIENT).status_code == 200


def test_admin_key_only_in_the_authorization_header(live: Any) -> None:
    _, http = live
    for headers in ({"x-api-key": ADMIN_KEY}, {"api-key": ADMIN_KEY}, {"Authorization": ADMIN_KEY},
                    {"Authorization": f"Basic {ADMIN_KEY}"}):
        assert_openai_error(http.get("/admin/datasets", headers=headers), 401)
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert http.get("/admin/datasets", headers={"Authorization": f"{scheme} {ADMIN_KEY}"}).status_code == 200
    # /v1 keeps accepting the alternative headers some OpenAI-compatible clients send.
    body = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}]}
    assert http.post("/v1/chat/completions", json=body, headers={"api-key": CLIENT_KEY}).status_code == 200
