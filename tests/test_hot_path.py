"""The serving hot path under concurrency: ``dpicl serve --workers 2`` shares one metrics view and
writes whole access lines, a stale cache entry is re-checked with one store lookup for all the
requests in flight, and ``freeze_gc`` moves the startup heap out of the collector's way. Speed itself
is measured by benchmarks/proxy_overhead.py, not here."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from proxy.app import create_app
from tests.test_app_support import (  # noqa: F401 - fixtures
    CLIENT_KEY, FAKE_MODEL, LiveServer, admin_headers, dataset_rows, fake_upstream, free_port, jsonl_bytes,
    make_config, task_spec, tiny_model_dir, upload,
)

ROOT = Path(__file__).resolve().parents[1]
CHAT = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hello"}]}


def test_two_workers_share_metrics_and_write_whole_access_lines(tmp_path: Path, fake_upstream: Any) -> None:
    config = {
        "model_list": [{"model_name": FAKE_MODEL, "litellm_params": {"model": "openai/fake-model",
                                                                     "api_base": fake_upstream.base_url}}],
        "store": {"url": f"sqlite:///{tmp_path}/s.db"},
        "client_keys": [{"name": "app1", "key_env": "APP1_KEY", "tasks": ["*"]}],
        "server": {"metrics_token_env": "SCRAPE_TOKEN"},  # a Prometheus scrape token (the admin key works too)
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DPICL_CONFIG", "PROMETHEUS_MULTIPROC_DIR")}
    env.update(PYTHONPATH=str(ROOT), APP1_KEY=CLIENT_KEY, DPICL_ADMIN_KEY="adm", DPICL_DATA_DIR=str(tmp_path),
               SCRAPE_TOKEN="scrape-secret")
    err = (tmp_path / "stderr.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--config", str(tmp_path / "c.yaml"),
                             "--port", str(port), "--workers", "2"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}"
    sent = 40
    try:
        deadline = time.monotonic() + 120
        ready = 0
        while ready < 5 and time.monotonic() < deadline:  # both workers up: several answers in a row
            try:
                ready = ready + 1 if httpx.get(url + "/health/liveness", timeout=2).status_code == 200 else 0
            except httpx.HTTPError:
                ready = 0
                time.sleep(0.2)
        assert proc.poll() is None and ready == 5, "server did not start"
        for _ in range(sent):  # a new connection each time, so both workers take some
            r = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30,
                           headers={"Authorization": f"Bearer {CLIENT_KEY}", "Connection": "close"})
            assert r.status_code == 200, r.text
        for _ in range(4):  # whichever worker answers /metrics, it counts every worker's requests
            text = httpx.get(url + "/metrics", headers={"Connection": "close",
                                                        "Authorization": "Bearer scrape-secret"}).text
            counted = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                          if line.startswith("dpicl_requests_total{") and "/v1/chat/completions" in line
                          and 'status="200"' in line)
            assert counted == sent
            assert "dpicl_requests_created" not in text  # multiprocess mode (no per-process _created)
    finally:
        proc.terminate()
        proc.wait(60)
        err.close()
    lines = (tmp_path / "stderr.log").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert all(line.startswith("{") for line in lines if line.strip()), "every log line is one JSON object"
    chats = [r for r in records if r.get("event") == "request" and r.get("path") == "/v1/chat/completions"]
    assert len(chats) == sent and all(r["status"] == 200 and r["client"] == "app1" for r in chats)
    assert not os.environ.get("PROMETHEUS_MULTIPROC_DIR")


def test_stale_cache_is_rechecked_with_one_lookup(tmp_path: Path, fake_upstream: Any, tiny_model_dir: str) -> None:
    spec = task_spec("t", "d", generation={"mode": "fixed", "num_subsets": 2, "shots_per_subset": 1,
                                           "max_tokens": 3, "top_k": 8, "sigma": 1.0})
    cfg = make_config(f"sqlite:///{tmp_path}/s.db", fake_upstream.base_url, tiny_model_dir, tasks=[spec],
                      client_tasks=["*"], extra_server={"cache_recheck_seconds": 0.2})
    app = create_app(cfg)
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert upload(http, "d", jsonl_bytes(dataset_rows(20)), epsilon=20).status_code == 201
        assert http.post("/admin/tasks/t/demos", headers=admin_headers(), json={"wait": True}).status_code == 200
        demos = app.state.demos
        lookups = []
        original = demos._lookup_sync

        def counting(task: Any) -> Any:
            lookups.append(task.name)
            time.sleep(0.05)  # a store that takes a moment, so requests pile up behind the lookup
            return original(task)

        demos._lookup_sync = counting
        time.sleep(0.3)  # the entry is now older than cache_recheck_seconds

        async def burst() -> list[int]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
                rs = await asyncio.gather(*(client.post("/v1/chat/completions", json={**CHAT, "model": "t"},
                                                        headers={"Authorization": f"Bearer {CLIENT_KEY}"})
                                            for _ in range(24)))
            return [r.status_code for r in rs]

        assert asyncio.run(burst()) == [200] * 24
        assert 1 <= len(lookups) <= 2, lookups  # not one per request


def test_freeze_gc_after_startup(tmp_path: Path, fake_upstream: Any) -> None:
    cfg = make_config(f"sqlite:///{tmp_path}/s.db", fake_upstream.base_url, None)
    try:
        with LiveServer(create_app(cfg, freeze_gc=True)) as srv:
            assert httpx.get(srv.url + "/health/liveness").status_code == 200
            assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()


def test_gc_guard_refreezes_after_a_slow_full_collection() -> None:
    from proxy.gctune import GcGuard

    guard = GcGuard(slow=0.0)  # every full collection counts as slow
    try:
        guard.start()
        frozen = gc.get_freeze_count()
        assert not guard.tick()  # nothing happened since start
        kept = [[i] for i in range(50_000)]  # long-lived objects created after startup (a lazy import)
        gc.collect()
        assert guard.tick() and guard.refreezes == 1
        assert gc.get_freeze_count() >= frozen + len(kept)
        assert not guard.tick()
    finally:
        guard.stop()
        gc.unfreeze()
    assert guard._callback not in gc.callbacks
