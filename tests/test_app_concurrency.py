"""Two ``dpicl serve`` processes on one real Redis, 50+ concurrent warm-ups against a dataset whose
budget allows only a few: the ledger never exceeds the budget and every refusal is a clean error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml

from aggregation.accounting import PartitionedLedger, event_from_dict
from tests.test_app_support import (  # noqa: F401 - fixtures
    ADMIN_KEY, LABELS, admin_headers, dataset_rows, free_port, jsonl_bytes, task_spec, tiny_model_dir,
)

WARMUPS = 50
FITS = 3  # the budget is set so that exactly this many of the concurrent warm-ups fit
FAST = {"mode": "fixed", "num_subsets": 2, "shots_per_subset": 1, "max_tokens": 2, "top_k": 8, "sigma": 1.5}


def _start(config: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "DPICL_ADMIN_KEY": ADMIN_KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "DPICL_CACHE_DIR": os.environ.get("DPICL_CACHE_DIR", "/tmp/dpicl-cache")}
    env.pop("DPICL_CONFIG", None)
    out = open(log, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--port", str(port), "--config", str(config)],
                            env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def _wait_ready(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health/readiness", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become ready")


def test_two_processes_one_redis_never_overspend(tmp_path, redis_url, tiny_model_dir):
    config = tmp_path / "dpicl.yaml"
    config.write_text(yaml.safe_dump({
        "store": {"url": redis_url},
        "server": {"local_model": tiny_model_dir, "cache_recheck_seconds": 0.2},
    }))
    procs = []
    try:
        for i in range(2):
            procs.append((*_start(config, tmp_path / f"server{i}.log"), tmp_path / f"server{i}.log"))
        for proc, url, log in procs:
            _wait_ready(proc, url, log)
        urls = [url for _, url, _ in procs]
        adm = admin_headers()
        with httpx.Client(timeout=300, headers=adm) as http:
            r = http.post(urls[0] + "/admin/datasets", data={"name": "shared", "epsilon": "100", "labels": json.dumps(LABELS)},
                          files={"file": ("rows.jsonl", jsonl_bytes(dataset_rows(100)), "application/octet-stream")})
            assert r.status_code == 201, r.text
            ds = r.json()
            budget_url = urls[1] + f"/admin/datasets/{ds['id']}/budget"
            # Distinct seeds = distinct cache keys, so every warm-up is a real, charged generation.
            for i in range(WARMUPS + 1):
                t = http.post(urls[i % 2] + "/admin/tasks",
                              json=task_spec(f"c{i}", "shared", generation=FAST, seed=i, upstream="local/smollm2"))
                assert t.status_code == 201, t.text
            # One warm-up first: it releases the DP pool sizes, so every later set costs the same
            # events. Then set the budget so that exactly FITS more sets fit.
            assert http.post(urls[0] + f"/admin/tasks/c{WARMUPS}/demos", json={"wait": True}).status_code == 200
            status = http.get(budget_url).json()
            ledger = PartitionedLedger(status["budget_delta"])
            for e in status["entries"]:
                ledger.add(e["partition"], event_from_dict(e["event"]))
            one_set = [(e["partition"], event_from_dict(e["event"])) for e in status["entries"] if e["partition"] != "*"]
            assert len(one_set) == 3
            after = [ledger.epsilon_if_many(one_set * k) for k in (FITS, FITS + 1)]
            budget = (after[0] + after[1]) / 2
            assert http.put(budget_url, json={"epsilon": budget}).status_code == 200

            def warm(i: int) -> httpx.Response:
                return httpx.post(urls[i % 2] + f"/admin/tasks/c{i}/demos", json={"wait": True}, headers=adm,
                                  timeout=300)

            with ThreadPoolExecutor(max_workers=WARMUPS) as pool:
                responses = list(pool.map(warm, range(WARMUPS)))

            ok = [r for r in responses if r.status_code == 200]
            refused = [r for r in responses if r.status_code != 200]
            for r in refused:
                assert r.status_code in (402, 409), r.text
                err = r.json()["error"]
                assert set(err) >= {"message", "type", "code"}
                assert "remains" in err["message"]
            # Exactly the sets that fit were generated: no overspend, and no refusal while budget was left.
            assert len(ok) == FITS, [r.status_code for r in responses]
            assert all(r.json()["charged"] for r in ok)

            status = http.get(budget_url).json()
        # Recompute the spend independently from the raw ledger entries.
        ledger = PartitionedLedger(status["budget_delta"])
        for e in status["entries"]:
            ledger.add(e["partition"], event_from_dict(e["event"]))
        assert ledger.spent() <= budget + 1e-9
        assert status["spent_epsilon"] <= budget + 1e-9
        demo_entries = [e for e in status["entries"] if e["partition"] != "*"]
        assert len(demo_entries) == 3 * (len(ok) + 1)  # one charge per label per generated set, nothing else
        assert len({e["reason"] for e in demo_entries}) == len(ok) + 1
    finally:
        for proc, _, _ in procs:
            proc.terminate()
        for proc, _, _ in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    for _, _, log in procs:
        assert "Traceback" not in log.read_text(errors="replace")
