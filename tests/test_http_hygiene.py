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


def test_progress_polls_are_logged_at_debug_not_info(live: Any) -> None:
    """``dpicl tasks warm`` and the console poll the warm-up and job status every second or two:
    those successful GETs go to debug level, so the info log keeps the requests that change things."""
    _, http = live
    http.headers.update(admin_headers())
    with capture_logs() as logs:
        for _ in range(3):
            assert http.get("/admin/warmups").status_code == 200
            assert http.get("/admin/jobs").status_code == 200
        assert http.get("/admin/jobs/nope").status_code == 404  # an error is still worth a line
        assert http.get("/admin/datasets").status_code == 200
        from proxy.logs import flush_access_log

        flush_access_log()
        time.sleep(0.3)  # the access writer batches lines (at most ACCESS_FLUSH_SECONDS late)
    info = [r for r in (json.loads(line) for line in logs.lines if line.startswith("{"))
            if r.get("event") == "request" and r.get("level") == "info"]
    paths = [r["path"] for r in info]
    assert "/admin/datasets" in paths and "/admin/jobs/nope" in paths
    assert "/admin/warmups" not in paths and "/admin/jobs" not in paths, paths


def test_poll_routes() -> None:
    from proxy.logs import is_poll

    assert is_poll("GET", "/admin/warmups/w_1", 200) and is_poll("GET", "/admin/jobs/j_1", 200)
    assert not is_poll("POST", "/admin/warmups/w_1/cancel", 200)
    assert not is_poll("GET", "/admin/jobs/j_1/result", 200)  # a download, not a poll
    assert not is_poll("GET", "/admin/warmups/w_1", 404)
    assert not is_poll("GET", "/admin/datasets", 200)


# -- issue 20, section 4: inputs that broke something ---------------------------------------------------
#: Where a test body gets its deeply nested value (the text is spliced in: json.dumps recurses).
DEEP = "__deep__"


def _deep_body(body: dict[str, Any], depth: int) -> str:
    """``body`` as JSON text with the string DEEP replaced by arrays/objects nested ``depth`` deep."""
    opens = "".join('{"k":' if i % 2 else "[" for i in range(depth))
    closes = "".join("}" if i % 2 else "]" for i in reversed(range(depth)))
    return json.dumps(body).replace(json.dumps(DEEP), opens + '"leaf"' + closes)


@pytest.mark.parametrize("depth", [65, 300, 1000])
def test_deeply_nested_json_is_400_everywhere(live: Any, depth: int) -> None:
    _, http = live
    chat = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        ("POST", "/v1/chat/completions", {**chat, "metadata": DEEP}, CLIENT),
        ("POST", "/v1/completions", {"model": FAKE_MODEL, "prompt": "hi", "user": DEEP}, CLIENT),
        ("POST", "/admin/tasks", {**task_spec("t", "d"), "label_words": DEEP}, admin_headers()),
        ("POST", "/admin/keys", {"name": "k", "tasks": DEEP}, admin_headers()),
        ("PUT", "/admin/budget/d", {"epsilon": 1, "delta": DEEP}, admin_headers()),
        ("POST", "/admin/jobs", {"kind": "pe", "dataset": "d", "x": DEEP}, admin_headers()),
    ]
    for method, path, body, headers in cases:
        r = http.request(method, path, content=_deep_body(body, depth),
                         headers={**headers, "content-type": "application/json"})
        err = assert_openai_error(r, 400)
        assert err["code"] == "invalid_json" and "levels deep" in err["message"], (path, err)
    # The limit leaves room for every real body: 60 levels in an extra field are forwarded as they are.
    r = http.post("/v1/chat/completions", content=_deep_body({**chat, "metadata": DEEP}, 60),
                  headers={**CLIENT, "content-type": "application/json"})
    assert r.status_code == 200, r.text


def test_deeply_nested_upload_fields_are_400(live: Any) -> None:
    _, http = live
    deep = "[" * 5000 + "]" * 5000
    err = assert_openai_error(upload(http, "d", jsonl_bytes(dataset_rows(2)), labels=deep), 400)
    assert err["code"] == "invalid_labels"
    rows = jsonl_bytes(dataset_rows(2)) + ('{"text": ' + deep + ', "label": "LOC"}\n').encode()
    err = assert_openai_error(upload(http, "d", rows, labels=["LOC", "NUM", "HUM"]), 400)
    assert err["code"] == "invalid_dataset"


def _slow_header_client(port: int, interval: float, deadline: float) -> tuple[bool, bytes]:
    """Send a request head one byte at a time, never finishing it: (closed by the server, what it sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.settimeout(interval)
    head = b"GET /health/liveness HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100_000
    received = b""
    try:
        for byte in head:
            if time.monotonic() > deadline:
                return False, received
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # reset: the server closed it
                return True, received
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return True, received
            if not chunk:
                return True, received
            received += chunk
        return False, received
    finally:
        sock.close()


@pytest.fixture(params=["httptools", "h11"])
def guarded(request: Any, tmp_path: Any) -> Any:
    """A live server with a 1 s header deadline on either of uvicorn's HTTP protocols, in front of an
    upstream that takes 2 s to answer."""
    import functools

    from proxy.devtools.fake_upstream import FakeOptions, FakeUpstream
    from proxy.httpguard import GuardedH11Protocol, GuardedHttpToolsProtocol

    cls = GuardedHttpToolsProtocol if request.param == "httptools" else GuardedH11Protocol
    with FakeUpstream(FakeOptions(delay=2.0)) as slow:
        cfg = make_config(f"sqlite:///{tmp_path}/g.db", slow.base_url, None, client_tasks=["*"],
                          extra_server={"header_timeout": 1.0})
        with LiveServer(create_app(cfg), http=functools.partial(cls, header_timeout=1.0)) as srv:
            yield srv


def test_slow_request_headers_are_cut_off(guarded: Any) -> None:
    # A generous bound (the deadline is 1 s): the server must close the connection well before it.
    closed, received = _slow_header_client(guarded.port, 0.1, time.monotonic() + 30)
    assert closed, "the server kept a connection whose headers never finished"
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    assert b'"header_timeout"' in received
    # A connection that sends nothing at all is closed too.
    sock = socket.create_connection(("127.0.0.1", guarded.port), timeout=30)
    try:
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 408") and sock.recv(65536) == b""
    finally:
        sock.close()


def test_header_deadline_spares_slow_answers_and_kept_alive_connections(guarded: Any) -> None:
    # The upstream takes 2 s, twice the header deadline: the request's headers arrived in time, so
    # the answer is waited for; the next request on the same connection gets a fresh deadline.
    body = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=guarded.url, timeout=30, headers=CLIENT) as http:
        for stream in (False, True, False):
            r = http.post("/v1/chat/completions", json={**body, "stream": stream})
            assert r.status_code == 200, r.text
        assert http.get("/health/liveness").status_code == 200


@pytest.mark.parametrize(("path", "allowed"), [
    ("/admin/tasks", "GET, POST"), ("/admin/tasks/t", "DELETE, GET"), ("/v1/models", "GET, HEAD"),
    ("/v1/chat/completions", "POST"), ("/admin/keys", "GET, POST"),
])
def test_405_lists_every_allowed_method(live: Any, path: str, allowed: str) -> None:
    _, http = live
    for method in ("OPTIONS", "PATCH"):
        r = http.request(method, path, headers=admin_headers())
        assert_openai_error(r, 405)
        assert r.headers["allow"] == allowed


def test_one_budget_minimum_for_every_way_in(live: Any) -> None:
    from proxy.api.schemas import MIN_BUDGET_EPSILON
    from proxy.config import ConfigError

    _, http = live
    http.headers.update(admin_headers())
    for tiny in ("1e-300", "5e-324", str(MIN_BUDGET_EPSILON / 2)):
        err = assert_openai_error(upload(http, "tiny", jsonl_bytes(dataset_rows(2)), epsilon=tiny), 400)
        assert err["code"] == "invalid_budget"
    ds = upload(http, "d", jsonl_bytes(dataset_rows(2)), epsilon=MIN_BUDGET_EPSILON).json()
    assert ds["budget_epsilon"] == MIN_BUDGET_EPSILON
    for tiny in (5e-324, 1e-300, MIN_BUDGET_EPSILON / 2):
        assert_openai_error(http.put("/admin/budget/d", json={"epsilon": tiny}), 400)
        assert_openai_error(http.put(f"/admin/datasets/{ds['id']}/budget", json={"epsilon": tiny}), 400)
    with pytest.raises(ConfigError, match="default_budget_epsilon"):
        make_config("sqlite:///unused.db", "http://127.0.0.1:9", None, extra_server={"default_budget_epsilon": 1e-300})


def test_query_bounds_are_enforced_as_documented(live: Any) -> None:
    _, http = live
    http.headers.update(admin_headers())
    for query in ("limit=2122", "limit=0", "limit=x", "before=0", f"before={2**70}"):
        err = assert_openai_error(http.get(f"/admin/audit?{query}"), 400)
        assert err["param"] == query.split("=")[0]
    assert http.get("/admin/audit?limit=1000&before=5").status_code == 200


def test_an_upstream_answer_nested_too_deeply_is_502(live: Any) -> None:
    srv, http = live

    class Deep:
        async def chat(self, body: dict) -> dict:
            answer: Any = "leaf"
            for _ in range(300):
                answer = [answer]
            return {"object": "chat.completion", "choices": answer}

        chat_stream = None  # not called: the request does not stream

    srv.app.state.upstreams[FAKE_MODEL] = Deep()
    r = http.post("/v1/chat/completions", json={"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}]},
                  headers=CLIENT)
    err = assert_openai_error(r, 502)
    assert err["code"] == "upstream_error" and "nests too deeply" in err["message"]
