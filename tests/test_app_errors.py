"""Bad input and failures get 4xx/5xx OpenAI-style errors; no private row ever leaves the proxy
(responses or logs); metrics and health endpoints."""

from __future__ import annotations

import json

import httpx
import pytest

from proxy.app import create_app
from proxy.devtools.fake_upstream import FakeOptions, FakeUpstream
from tests.test_app_support import (  # noqa: F401 - fixtures
    CANARY, CLIENT_KEY, FAKE_MODEL, LiveServer, admin_headers, assert_openai_error, capture_logs, csv_bytes,
    dataset_rows, fake_upstream, jsonl_bytes, make_config, task_spec, tiny_model_dir, upload,
)

LIMIT = 100_000
FAST = {"mode": "fixed", "num_subsets": 2, "shots_per_subset": 1, "max_tokens": 3, "top_k": 8, "sigma": 1.5}
CLIENT = {"Authorization": f"Bearer {CLIENT_KEY}"}


@pytest.fixture
def server(tmp_path, fake_upstream, tiny_model_dir):
    spec = task_spec("trec", "qs", generation=FAST)
    cfg = make_config(f"sqlite:///{tmp_path}/s.db", fake_upstream.base_url, tiny_model_dir, tasks=[spec],
                      client_tasks=["*"], max_body=LIMIT)
    app = create_app(cfg)
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        yield app, http


def test_bad_requests_get_openai_errors(server):
    _, http = server
    chat = "/v1/chat/completions"
    err = assert_openai_error(http.post(chat, content=b"{not json", headers={**CLIENT, "content-type": "application/json"}), 400)
    assert err["code"] == "invalid_json"
    assert_openai_error(http.post(chat, content=b"[1, 2]", headers={**CLIENT, "content-type": "application/json"}), 400)
    assert_openai_error(http.post(chat, content=b"", headers={**CLIENT, "content-type": "application/json"}), 400)
    err = assert_openai_error(http.post(chat, json={"model": FAKE_MODEL}, headers=CLIENT), 400)
    assert err["param"] == "messages"
    assert_openai_error(http.post(chat, json={"messages": [{"role": "user", "content": "x"}]}, headers=CLIENT), 400)
    assert_openai_error(http.post(chat, json={"model": FAKE_MODEL, "messages": []}, headers=CLIENT), 400)
    assert_openai_error(http.post(chat, json={"model": FAKE_MODEL, "messages": [{"content": "no role"}]}, headers=CLIENT), 400)
    assert_openai_error(http.post("/v1/completions", json={"model": FAKE_MODEL}, headers=CLIENT), 400)
    err = assert_openai_error(http.post(chat, json={"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]},
                                        headers=CLIENT), 404)
    assert err["code"] == "model_not_found"
    err = assert_openai_error(http.post(chat, content=b"model=x", headers={**CLIENT, "content-type": "text/plain"}), 415)
    assert "application/json" in err["message"]
    # Token-array prompts cannot get a text prefix.
    assert_openai_error(http.post("/v1/completions", json={"model": "trec", "prompt": [1, 2, 3]}, headers=CLIENT), 400)
    assert_openai_error(http.get("/v1/nothing-here"), 404)
    assert_openai_error(http.get(chat, headers=CLIENT), 405)


def test_oversize_bodies(server):
    _, http = server
    big = json.dumps({"model": FAKE_MODEL, "messages": [{"role": "user", "content": "x" * (LIMIT + 10)}]}).encode()
    err = assert_openai_error(http.post("/v1/chat/completions", content=big,
                                        headers={**CLIENT, "content-type": "application/json"}), 413)
    assert str(LIMIT) in err["message"]

    def chunks():  # no Content-Length: the limit applies to the streamed body
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    assert_openai_error(http.post("/v1/chat/completions", content=chunks(),
                                  headers={**CLIENT, "content-type": "application/json"}), 413)
    r = upload(http, "big", jsonl_bytes(dataset_rows(1000)))
    assert_openai_error(r, 413)
    # A malformed Content-Length (httpx refuses to send one, so write the request by hand).
    import socket

    host, port = http.base_url.host, http.base_url.port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: abc\r\nConnection: close\r\n\r\n{}")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.split(b" ", 2)[1] in (b"400", b"413"), reply[:200]


def test_bad_uploads_and_budgets(server):
    _, http = server
    good = jsonl_bytes(dataset_rows(3))
    bad_line = good + b'{"text": "leak ' + CANARY.encode() + b'", "label": \n'
    cases = [
        (upload(http, "a", bad_line), 400),
        (upload(http, "a", b"text,category\n" + CANARY.encode() + b",x\n", filename="r.csv"), 400),
        (upload(http, "a", b""), 400),
        (upload(http, "a", b"\xff\xfe" + CANARY.encode()), 400),
        (upload(http, "a", json.dumps({"text": CANARY, "label": ""}).encode()), 400),
        (upload(http, "a", good, filename="rows.txt"), 415),
        (upload(http, "a", good, epsilon=-1), 400),
        (upload(http, "a", good, epsilon="lots"), 400),
        (upload(http, "a", good, epsilon="inf"), 400),
        (upload(http, "a", good, delta=1.5), 400),
        (upload(http, "bad name!", good), 400),
        (http.post("/admin/datasets", headers=admin_headers(), files={"name": (None, "a")}), 400),  # no file
        (http.post("/admin/datasets", headers=admin_headers(), json={"name": "a", "rows": []}), 415),
        (http.post("/admin/datasets", headers={**admin_headers(), "content-type": "multipart/form-data; boundary=zz"},
                   content=b"--zz\r\ngarbage" + CANARY.encode()), 400),
    ]
    for resp, status in cases:
        assert_openai_error(resp, status)
        assert CANARY not in resp.text
    assert http.get("/admin/datasets", headers=admin_headers()).json()["data"] == []


def test_upstream_failures_map_to_502_and_504(tmp_path, tiny_model_dir):
    with FakeUpstream(FakeOptions(fail_first=-1, fail_status=503, echo_in_errors=True)) as failing:
        cfg = make_config(f"sqlite:///{tmp_path}/a.db", failing.base_url, None, client_tasks=["*"])
        app = create_app(cfg)
        with LiveServer(app) as srv:
            body = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "secret prompt text"}]}
            r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers=CLIENT)
            assert_openai_error(r, 502)
            assert "secret prompt text" not in r.text
            r = httpx.post(srv.url + "/v1/chat/completions", json={**body, "stream": True}, headers=CLIENT)
            assert_openai_error(r, 502)
            assert 'dpicl_upstream_errors_total{model="fake-model",status="502"} 2.0' in httpx.get(srv.url + "/metrics",
                                                                                          headers=admin_headers()).text
    with FakeUpstream(FakeOptions(hang=True)) as hanging:
        cfg = make_config(f"sqlite:///{tmp_path}/b.db", hanging.base_url, None, client_tasks=["*"],
                          extra_server={"timeout": 0.5, "retries": 0})
        with LiveServer(create_app(cfg)) as srv:
            r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers=CLIENT, timeout=30)
            assert_openai_error(r, 504)


def test_health_and_metrics(server):
    app, http = server
    assert http.get("/health/liveness").json() == {"status": "ok"}
    assert http.get("/health/readiness").status_code == 200
    http.post("/v1/chat/completions", json={"model": FAKE_MODEL, "messages": [{"role": "user", "content": "x"}]},
              headers=CLIENT)
    assert upload(http, "qs", jsonl_bytes(dataset_rows(5))).status_code == 201
    http.post("/v1/chat/completions", json={"model": "trec", "messages": [{"role": "user", "content": "x"}]},
              headers=CLIENT)  # 409: not warmed (cache miss)
    text = http.get("/metrics", headers=admin_headers()).text
    assert 'dpicl_requests_total{model="fake-model",route="/v1/chat/completions",status="200"} 1.0' in text
    assert 'dpicl_requests_total{model="trec",route="/v1/chat/completions",status="409"} 1.0' in text
    assert 'dpicl_demo_cache_total{result="miss",task="trec"} 1.0' in text
    assert "dpicl_request_seconds_bucket" in text

    def broken_ping() -> bool:
        raise ConnectionError("store down")

    app.state.store.ping = broken_ping
    assert_openai_error(http.get("/health/readiness"), 503)


def test_canary_never_leaves_the_proxy(server):
    """Every endpoint, success and failure paths: the canary in the private rows never appears in a
    response body or a log line."""
    app, http = server
    seen: list[str] = []
    adm = admin_headers()
    with capture_logs() as logs:
        def rec(resp: httpx.Response) -> httpx.Response:
            seen.append(resp.text)
            seen.append(json.dumps(dict(resp.headers)))
            return resp

        ds = rec(upload(http, "qs", jsonl_bytes(dataset_rows(100)), epsilon=30)).json()
        rec(upload(http, "qs-csv", csv_bytes(dataset_rows(10)), filename="r.csv"))
        rec(upload(http, "broken", jsonl_bytes(dataset_rows(2)) + CANARY.encode() + b"\n"))
        rec(http.get("/admin/datasets", headers=adm))
        rec(http.get(f"/admin/datasets/{ds['id']}", headers=adm))
        rec(http.post("/admin/tasks/trec/demos", headers=adm, json={"dry_run": True}))
        rec(http.post("/v1/chat/completions", headers=CLIENT,
                      json={"model": "trec", "messages": [{"role": "user", "content": "q"}]}))  # 409
        warm = rec(http.post("/admin/tasks/trec/demos", headers=adm, json={"wait": True}))
        assert warm.status_code == 200
        rec(http.get("/admin/tasks/trec/demos", headers=adm))
        rec(http.get("/admin/warmups", headers=adm))
        rec(http.get(f"/admin/warmups/{warm.json()['id']}", headers=adm))
        rec(http.get("/admin/tasks", headers=adm))
        rec(http.get("/admin/budget", headers=adm))
        rec(http.get(f"/admin/datasets/{ds['id']}/budget", headers=adm))
        rec(http.put(f"/admin/datasets/{ds['id']}/budget", headers=adm, json={"epsilon": 0.001}))
        for stream in (False, True):
            rec(http.post("/v1/chat/completions", headers=CLIENT, json={
                "model": "trec", "stream": stream, "messages": [{"role": "user", "content": "Question: where?"}]}))
            rec(http.post("/v1/completions", headers=CLIENT, json={
                "model": "trec", "stream": stream, "prompt": "Question: where?\nAnswer type:"}))
        rec(http.get("/v1/models", headers=CLIENT))
        rec(http.post("/admin/tasks", headers=adm, json=task_spec("t2", "qs", generation={**FAST, "sigma": 0.2})))
        rec(http.post("/admin/tasks/t2/demos", headers=adm, json={}))  # over budget
        rec(http.get("/metrics", headers=adm))
        rec(http.delete("/admin/tasks/trec/demos", headers=adm))
        rec(http.delete(f"/admin/datasets/{ds['id']}", headers=adm))
        rec(http.get("/health/readiness"))
    assert warm.json()["result"]["demonstrations"]
    for text in seen:
        assert CANARY not in text
    assert logs.lines, "the request log should have captured lines"
    for line in logs.lines:
        assert CANARY not in line
    # The demonstration text is DP output and may be shown to the admin; the rows never are.
    assert any('"event":"request"' in line for line in logs.lines)


def test_generator_failure_is_a_clean_error(tmp_path, fake_upstream):
    spec = task_spec("trec", "qs", generation=FAST)
    cfg = make_config(f"sqlite:///{tmp_path}/s.db", fake_upstream.base_url, str(tmp_path / "no-such-model"),
                      tasks=[spec])
    with LiveServer(create_app(cfg)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert upload(http, "qs", jsonl_bytes(dataset_rows(100))).status_code == 201
        err = assert_openai_error(http.post("/admin/tasks/trec/demos", headers=admin_headers(),
                                            json={"wait": True}), 502)
        assert "generator" in err["message"] and "stays spent" in err["message"]
        # The failed warm-up is a resource with the same clean error.
        failed = http.get("/admin/warmups", headers=admin_headers()).json()["data"][0]
        assert failed["state"] == "failed" and failed["error"]["message"] == err["message"]


def test_deleting_a_dataset_stops_serving_its_demos(server):
    _, http = server
    adm = admin_headers()
    ds = upload(http, "qs", jsonl_bytes(dataset_rows(100)), epsilon=10).json()
    assert http.post("/admin/tasks/trec/demos", headers=adm, json={"wait": True}).status_code == 200
    chat = {"model": "trec", "messages": [{"role": "user", "content": "q"}]}
    assert http.post("/v1/chat/completions", headers=CLIENT, json=chat).status_code == 200
    assert http.delete(f"/admin/datasets/{ds['id']}", headers=adm).status_code == 200
    err = assert_openai_error(http.post("/v1/chat/completions", headers=CLIENT, json=chat), 409)
    assert "an admin must warm them up" in err["message"]
    assert ds["id"] not in err["message"]  # clients never see dataset ids
    # The ledger and budget outlive the dataset: they belong to its name (a re-upload continues them).
    (kept,) = http.get("/admin/budget", headers=adm).json()["data"]
    assert (kept["name"], kept["versions"], kept["events"]) == ("qs", [], 4) and kept["epsilon_spent"] > 0
    assert len(http.get("/admin/budget/qs", headers=adm).json()["ledger"]) == 4
