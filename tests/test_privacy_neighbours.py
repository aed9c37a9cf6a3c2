"""Issue 10, part 1: the label domain is public configuration, not read from the rows.

The adversary adds one row with a label the dataset declares but does not contain. Everything the
service releases (upload and listing answers, the keys of the DP counts, ledger partitions and
events, the cache key, the per-label decisions, success or failure) must be the same for D and
D + that row, except through the DP counts' noise. To see "except through the noise" exactly,
the count noise is replaced by zeros: then the only difference allowed is the count itself.
"""

from __future__ import annotations

import dataclasses
import time
import json

import httpx
import numpy as np
import pytest

import proxy.budget
from aggregation.fewshot import GenerationConfig
from aggregation.planning import decide
from proxy.app import create_app
from proxy.serving.demos import cache_key
from tests.test_app_support import (  # noqa: F401 - fixtures
    CANARY, LABELS, LiveServer, admin_headers, dataset_rows, fake_upstream, jsonl_bytes, make_config, task_spec,
    tiny_model_dir, upload,
)

EMPTY = "RARE"  # declared, absent from D
DOMAIN = [*LABELS, EMPTY]
FAST = {"mode": "fixed", "num_subsets": 2, "shots_per_subset": 1, "max_tokens": 3, "top_k": 8, "sigma": 1.5}


class _ZeroNoise:
    """Count noise of zero, so that D and D' can be compared exactly (the test's only stub)."""

    def __init__(self, seed=None):
        pass

    def normal(self, scale: float, size: int) -> np.ndarray:
        return np.zeros(size)


def _released(tmp_path, name, rows, fake, model_dir) -> dict:
    """Upload ``rows`` to a fresh service, warm a task over the whole domain; what it released."""
    cfg = make_config(f"sqlite:///{tmp_path / name}.db", fake.base_url, model_dir, client_tasks=["*"])
    app = create_app(cfg)
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=300, headers=admin_headers()) as http:
        up = upload(http, "tickets", jsonl_bytes(rows), labels=DOMAIN, epsilon=20)
        assert up.status_code == 201, up.text
        ds = up.json()
        listing = http.get("/admin/datasets").json()["data"]
        assert http.post("/admin/tasks", json=task_spec("t", "tickets", generation=FAST)).status_code == 201
        dry = http.post("/admin/tasks/t/demos", json={"dry_run": True})
        warm = http.post("/admin/tasks/t/demos", json={"wait": True})
        cached = http.get("/admin/tasks/t/demos").json()
        budget = http.get("/admin/budget/tickets").json()
        meta = app.state.store.get_dataset(ds["id"])
        task = app.state.tasks.static.get("t") or app.state.tasks._admin["t"]
        gen = app.state.demos.generators.generator_id(task)
        # The cache key with the (random, public) dataset id fixed: what is left must not depend on rows.
        key = cache_key(task, dataclasses.replace(meta, id="ds_fixed"), gen)
        text = json.dumps([up.json(), listing, dry.json(), warm.json(), cached, budget])
        assert CANARY not in text
        return {
            "labels": ds["labels"], "listed_labels": [d["labels"] for d in listing],
            "dry_status": dry.status_code, "warm_status": warm.status_code,
            "count_keys": sorted(meta.noisy_counts), "counts": meta.noisy_counts,
            "ledger": [(e["kind"], e["partition"], e["event"]) for e in budget["ledger"]],
            "key": key, "decisions": cached["demonstrations"]["decisions"],
            "served_labels": cached["demonstrations"]["labels"],
        }


def test_neighbouring_datasets_release_the_same_structures(tmp_path, monkeypatch, fake_upstream, tiny_model_dir):
    monkeypatch.setattr(proxy.budget, "Noise", _ZeroNoise)
    d = dataset_rows(30)
    d_plus = d + [{"text": f"the one rare record {CANARY}", "label": EMPTY}]
    a = _released(tmp_path, "d", d, fake_upstream, tiny_model_dir)
    b = _released(tmp_path, "d_plus", d_plus, fake_upstream, tiny_model_dir)
    assert a["warm_status"] == b["warm_status"] == 200 and a["dry_status"] == b["dry_status"] == 200
    assert a["labels"] == b["labels"] == DOMAIN and a["listed_labels"] == b["listed_labels"] == [DOMAIN]
    assert a["count_keys"] == b["count_keys"] == sorted(DOMAIN)  # zeros included
    assert (a["counts"][EMPTY], b["counts"][EMPTY]) == (0.0, 1.0)  # the one allowed difference
    assert {k: v for k, v in a["counts"].items() if k != EMPTY} == {k: v for k, v in b["counts"].items() if k != EMPTY}
    assert a["ledger"] == b["ledger"]  # partitions and events
    assert {p for _, p, _ in a["ledger"]} == {"*", *DOMAIN}
    assert a["key"] == b["key"]
    assert a["decisions"] == b["decisions"] and a["served_labels"] == b["served_labels"] == DOMAIN
    assert a["decisions"][EMPTY]["decision"] == "public"  # small noisy pool: public fallback, no error


def test_decisions_follow_the_noisy_count_only():
    """Whatever the noise gives, the rule is a function of the released count and public settings."""
    cfg = GenerationConfig(mode="fixed", num_subsets=2, shots_per_subset=1, max_tokens=3, sigma=1.5)
    for noisy in (-30.0, 0.0, 1.9, 2.0, 150.0, None):
        decision, rule = decide(cfg, noisy)
        assert decision == ("private" if noisy is not None and noisy >= 2 else "public")
        assert "noisy pool size" in rule


@pytest.mark.parametrize("bad", [["LOC"], ["LOC", "NUM"]])
def test_a_row_outside_the_domain_changes_nothing_stored(tmp_path, fake_upstream, tiny_model_dir, bad):
    """The refusal is the same 400 whatever the row, and nothing (no dataset, no audit record) is kept."""
    cfg = make_config(f"sqlite:///{tmp_path}/s.db", fake_upstream.base_url, tiny_model_dir)
    app = create_app(cfg)
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60, headers=admin_headers()) as http:
        r = upload(http, "x", jsonl_bytes(dataset_rows(2)), labels=bad)
        assert r.status_code == 400 and r.json()["error"]["code"] == "label_outside_domain"
        assert app.state.store.list_datasets() == [] and app.state.store.audit() == []


def _client_view(tmp_path, name, rows, fake, model_dir) -> dict:
    """What a client key sees of a task with on_missing: generate (before and after the set exists)."""
    from tests.test_app_support import CLIENT_KEY

    cfg = make_config(f"sqlite:///{tmp_path / name}.db", fake.base_url, model_dir, client_tasks=["*"])
    app = create_app(cfg)
    client = {"Authorization": f"Bearer {CLIENT_KEY}"}
    body = {"model": "t", "messages": [{"role": "user", "content": "Question: where?"}]}
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=300, headers=admin_headers()) as http:
        upload(http, "tickets", jsonl_bytes(rows), labels=DOMAIN, epsilon=20)
        http.post("/admin/tasks", json=task_spec("t", "tickets", generation=FAST, on_missing="generate"))
        first = http.post("/v1/chat/completions", json=body, headers=client)
        for _ in range(600):
            served = http.post("/v1/chat/completions", json=body, headers=client)
            if served.status_code != 503:
                break
            time.sleep(0.1)
        denied = [http.get(p, headers=client).status_code for p in
                  ("/admin/warmups", "/admin/tasks/t/demos", "/admin/budget/tickets", "/admin/audit")]
        headers = {k: v for k, v in served.headers.items() if k.lower() not in ("date", "content-length")}
        text = first.text + served.text + json.dumps(headers)
        return {"first": (first.status_code, first.json(), first.headers.get("retry-after")),
                "served": served.status_code, "headers": sorted(headers), "denied": denied,
                "stats_seen": any(w in text for w in ("seconds", "tokens_done", "eta", "wu_", "epsilon"))}


def test_clients_see_no_generation_statistics(tmp_path, fake_upstream, tiny_model_dir):
    """Timing and size statistics of a generation are admin-only: what a client gets (status,
    error body, Retry-After, response header names) is the same for D and D plus one long record."""
    d = dataset_rows(30)
    d_plus = d + [{"text": "a very long rare record " * 40 + CANARY, "label": EMPTY}]
    a = _client_view(tmp_path, "d", d, fake_upstream, tiny_model_dir)
    b = _client_view(tmp_path, "d_plus", d_plus, fake_upstream, tiny_model_dir)
    assert a["first"][0] == 503 and a["served"] == 200
    assert a == b
    assert a["denied"] == [403, 403, 403, 403] and a["stats_seen"] is False
