"""Issue 10, part 5: a warm-up's epsilon_cost is the increase of the spent epsilon (the one-time
label histogram included), a dry run of a cached set costs 0, and warm-ups draw privacy units."""

from __future__ import annotations

import httpx
import pytest

from proxy.app import create_app
from tests.test_app_support import (  # noqa: F401 - fixtures
    LABELS, LiveServer, admin_headers, dataset_rows, fake_upstream, jsonl_bytes, make_config, task_spec,
    tiny_model_dir, upload,
)

FAST = {"mode": "fixed", "num_subsets": 2, "shots_per_subset": 1, "max_tokens": 3, "top_k": 8, "sigma": 1.5}


@pytest.fixture
def http(tmp_path, fake_upstream, tiny_model_dir):
    app = create_app(make_config(f"sqlite:///{tmp_path}/s.db", fake_upstream.base_url, tiny_model_dir))
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=300, headers=admin_headers()) as client:
        yield app, client


def test_epsilon_cost_is_the_increase_of_spent(http):
    app, client = http
    upload(client, "d", jsonl_bytes(dataset_rows(30)), epsilon=20)
    client.post("/admin/tasks", json=task_spec("a", "d", generation=FAST))
    client.post("/admin/tasks", json=task_spec("b", "d", generation=FAST, shots=2))
    first = client.post("/admin/tasks/a/demos", json={"wait": True}).json()
    spent1 = client.get("/admin/budget/d").json()["epsilon_spent"]
    assert first["epsilon_cost"] == pytest.approx(spent1)  # the histogram is part of the first cost
    assert first["epsilon_cost"] > first["result"]["epsilon"]
    assert first["result"]["epsilon_cost"] == pytest.approx(first["epsilon_cost"])
    counts = app.state.store.list_datasets()[0].noisy_counts  # the DP release the rule used
    assert {k: v["decision"] for k, v in first["result"]["decisions"].items()} == {
        lab: "private" if counts[lab] >= 2 else "public" for lab in LABELS}
    dry = client.post("/admin/tasks/a/demos", json={"dry_run": True}).json()
    assert dry["cached"] is True and dry["epsilon_cost"] == 0
    second = client.post("/admin/tasks/b/demos", json={"wait": True}).json()
    spent2 = client.get("/admin/budget/d").json()["epsilon_spent"]
    assert second["epsilon_cost"] == pytest.approx(spent2 - spent1)
    kinds = [e["kind"] for e in client.get("/admin/budget/d").json()["ledger"]]
    assert kinds[0] == "histogram" and set(kinds[1:]) == {"warmup"}


def test_units_make_the_pool_count_customers(http):
    """Sixty tickets of two customers are two units: the pool is too small to generate from, so the
    label falls back to the public prompt instead of sampling one customer's tickets."""
    app, client = http
    rows = [{"text": f"my invoice {i} is wrong", "label": "billing", "privacy_unit": f"c{i % 2}"} for i in range(60)]
    rows += [{"text": f"the line is down {i}", "label": "outage"} for i in range(60)]
    ds = upload(client, "t", jsonl_bytes(rows), labels=["billing", "outage"], epsilon=20).json()
    assert (ds["rows"], ds["units"]) == (120, 62)
    spec = task_spec("s", "t", generation={**FAST, "num_subsets": 10, "shots_per_subset": 2},
                     label_words={"billing": "billing", "outage": "outage"})
    client.post("/admin/tasks", json=spec)
    out = client.post("/admin/tasks/s/demos", json={"wait": True}).json()["result"]
    counts = app.state.store.get_dataset(ds["id"]).noisy_counts
    assert set(counts) == {"billing", "outage"}
    # With sigma 20 the noisy count of 2 units is below 20 = M*N about 84% of the time, and of 60
    # units above it about 98% of the time: check the rule against the released count, not luck.
    for label, noisy in counts.items():
        expected = "private" if noisy >= 20 else "public"
        assert out["decisions"][label]["decision"] == expected


def test_warmups_are_in_the_audit_log(http):
    app, client = http
    upload(client, "d", jsonl_bytes(dataset_rows(30)), epsilon=20)
    client.post("/admin/tasks", json=task_spec("a", "d", generation=FAST))
    view = client.post("/admin/tasks/a/demos", json={"wait": True}).json()
    client.post("/admin/tasks/a/demos", json={"dry_run": True})  # pricing is not an action
    actions = [(a["action"], a["target"]) for a in client.get("/admin/audit").json()["data"]]
    assert actions == [("warmup.start", "a"), ("task.create", "a"), ("dataset.upload", "d")]
    assert client.get("/admin/audit").json()["data"][0]["details"]["warmup_id"] == view["id"]
