"""Private clusters in serving (issue 19, section 4): ``generation.clusters: K``.

The clustering of a label is charged once on its partition before any row is embedded, stored
(centroids, DP sizes) and reused by later warm-ups and other tasks for free; each demonstration is
charged on ``label#j`` of its cluster; views show cluster ids and DP sizes, never rows.
"""

from __future__ import annotations

import dataclasses
import json
import time
import zlib

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

import proxy.budget
import proxy.serving.clusters
from aggregation.fewshot import GenerationConfig
from proxy.app import create_app
from proxy.cli import app as cli
from proxy.task_config import TaskConfig, stored_task
from proxy.serving.clusters import LabelClusters, plan_clusters
from proxy.serving.demos import cache_key
from proxy.store.base import DatasetMeta
from tests.test_app_support import (  # noqa: F401 - fixtures
    ADMIN_KEY, CANARY, LABELS, LiveServer, admin_headers, assert_openai_error, dataset_rows, fake_upstream,
    jsonl_bytes, legacy_cache_key, make_config, task_spec, tiny_model_dir, upload,
)

from tests.test_privacy_neighbours import DOMAIN, EMPTY, FAST, _ZeroNoise  # noqa: E402,F401 - shared with the neighbour test


class FakeEmbed:
    """A cheap deterministic embedder that records, at every call, what the ledger held then."""

    def __init__(self, app, name: str):
        self.app, self.name, self.seen = app, name, []

    def install(self) -> "FakeEmbed":
        """Use it in the app's warm-ups (call once the app has started)."""
        self.app.state.demos.warmup.embedder = self
        return self

    def unavailable(self):
        return None

    def __call__(self, texts):
        self.seen.append(({e.kind for e in self.app.state.store.ledger(self.name)}, len(texts)))
        out = np.zeros((len(texts), 384))
        for i, t in enumerate(texts):
            out[i, zlib.crc32((t.split() or [""])[0].encode()) % 384] = 1.0
            out[i, zlib.crc32(t.encode()) % 384] += 0.5
        return out


def _kinds(budget: dict, kind: str) -> list[tuple[str, dict]]:
    return [(e["partition"], e["event"]) for e in budget["ledger"] if e["kind"] == kind]


@pytest.fixture
def env(fake_upstream, tiny_model_dir) -> tuple[str, str]:
    """(fake upstream URL, tiny local model directory)."""
    return fake_upstream.base_url, tiny_model_dir


def _serve(tmp_path, env, name="s"):
    return create_app(make_config(f"sqlite:///{tmp_path / name}.db", env[0], env[1], client_tasks=["*"]))


def test_clustering_is_charged_once_and_reused_by_later_warmups_and_tasks(tmp_path, env):
    """Real MiniLM. The first warm-up charges the clustering on each label partition (before a row
    is embedded) and each shot on ``label#j``; a second warm-up of the task and a second task on the
    same dataset version add no clustering charge; the label histogram is not released."""
    app = _serve(tmp_path, env)
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=600, headers=admin_headers()) as http:
        # 120 units a label: each of the 2 clusters' DP sizes (count noise std 20) clears the pool
        # threshold almost surely, so the clustered path is what this test exercises.
        assert upload(http, "qs", jsonl_bytes(dataset_rows(120)), labels=LABELS, epsilon=50).status_code == 201
        gen = {**FAST, "clusters": 2}
        assert http.post("/admin/tasks", json=task_spec("a", "qs", generation=gen, shots=2)).status_code == 201
        dry = http.post("/admin/tasks/a/demos", json={"dry_run": True}).json()
        assert dry["estimate"] is True and dry["fits"] is True
        assert "clusters" not in dry  # planned on an estimate: no DP size to show yet
        first = http.post("/admin/tasks/a/demos", json={"wait": True})
        assert first.status_code == 200, first.text
        result = first.json()["result"]
        budget = http.get("/admin/budget/qs").json()
        clustering = _kinds(budget, "clustering")
        assert sorted({p for p, _ in clustering}) == sorted(LABELS) and len(clustering) == 2 * len(LABELS)
        assert _kinds(budget, "histogram") == []  # the clusters' DP sizes replace the label histogram
        warm = _kinds(budget, "warmup")
        for label in LABELS:
            used = result["clusters"].get(label, [])
            assert sum(c["shots"] for c in used) == 2 or result["decisions"][label]["decision"] != "private"
            assert {p for p, _ in warm if p.startswith(label + "#")} == {f"{label}#{c['cluster']}" for c in used}
        # A label none of whose DP sizes reaches the pool threshold follows the small-pool rule and
        # its (public) demonstrations name no cluster; every other demonstration names its own.
        for d in result["demonstrations"]:
            used = {c["cluster"] for c in result["clusters"].get(d["label"], [])}
            assert (d.get("cluster") in used and "cluster_size" in d) if used else "cluster" not in d
        assert set(budget["partitions"]) >= {p for p, _ in warm} | set(LABELS)

        http.delete("/admin/tasks/a/demos")
        again = http.post("/admin/tasks/a/demos", json={"wait": True})
        assert again.status_code == 200 and again.json()["result"]["charged"] is True
        assert http.post("/admin/tasks", json=task_spec("b", "qs", generation=gen, shots=1)).status_code == 201
        dry_b = http.post("/admin/tasks/b/demos", json={"dry_run": True}).json()
        assert dry_b["estimate"] is False and set(dry_b["clusters"]) <= set(LABELS)  # released: exact price
        assert http.post("/admin/tasks/b/demos", json={"wait": True}).status_code == 200
        after = http.get("/admin/budget/qs").json()
        assert _kinds(after, "clustering") == clustering  # no further clustering cost
        assert len(_kinds(after, "warmup")) > len(warm)
        cached = http.get("/admin/tasks/b/demos").json()
        text = json.dumps([dry, result, budget, after, cached, again.json()])
        assert CANARY not in text and "centroid" not in text


def test_the_embedder_is_held_by_each_app_and_worker_and_loads_only_when_used(tmp_path, env, monkeypatch):
    """No module-level cache: every app's warm-up (made in its lifespan) and the worker's hold their
    own MiniLM handle, as they hold their generators; none loads its model before a clustered task
    embeds something."""
    import proxy.serving.warmup_runners as runners
    from aggregation.embeddings import MiniLMEmbedder

    apps = [_serve(tmp_path, env, name) for name in ("a", "b")]
    with LiveServer(apps[0]), LiveServer(apps[1]):
        held = [app.state.demos.warmup.embedder for app in apps]
    config = make_config(f"sqlite:///{tmp_path / 'w'}.db", env[0], env[1])
    monkeypatch.setattr(runners, "_WORKER", {"config": config})
    held.append(runners._worker_executor().warmup.embedder)
    assert all(isinstance(e, MiniLMEmbedder) and e._model is None for e in held)
    assert len({id(e) for e in held}) == 3
    assert not hasattr(proxy.serving.clusters, "shared_embedder")


def test_spend_comes_before_any_row_is_embedded_and_refusals_cost_nothing(store_url, env):
    """On both backends (a real redis-server for Redis): the release is stored and reused there."""
    app = create_app(make_config(store_url, env[0], env[1], client_tasks=["*"]))
    embed = FakeEmbed(app, "qs")
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=600, headers=admin_headers()) as http:
        embed.install()
        assert upload(http, "qs", jsonl_bytes(dataset_rows(30)), labels=LABELS, epsilon=1.2).status_code == 201
        spec = task_spec("t", "qs", generation={**FAST, "clusters": 3}, epsilon=1.0)
        assert http.post("/admin/tasks", json=spec).status_code == 201
        # The clustering (charged on every label) plus the set does not fit: refused, nothing spent.
        refused = http.post("/admin/tasks/t/demos", json={"wait": True})
        assert_openai_error(refused, 402)
        assert http.get("/admin/budget/qs").json()["ledger"] == [] and embed.seen == []  # nothing read
        http.put("/admin/budget/qs", json={"epsilon": 30})
        assert http.post("/admin/tasks/t/demos", json={"wait": True}).status_code == 200
        http.delete("/admin/tasks/t/demos")
        assert http.post("/admin/tasks/t/demos", json={"wait": True}).status_code == 200
        kinds = [e["kind"] for e in http.get("/admin/budget/qs").json()["ledger"]]
        assert kinds.count("clustering") == 2 * len(LABELS) and "histogram" not in kinds  # charged once
    # The first call loads the embedder on one public text; every call that embeds rows comes after the charge.
    assert embed.seen[0] == (set(), 1) and len(embed.seen) > 1
    assert all("clustering" in kinds for kinds, _ in embed.seen[1:])


def _released(tmp_path, name, rows, env) -> dict:
    """Upload ``rows``, warm a clustered task over the whole domain; what leaves the process."""
    app = _serve(tmp_path, env, name)
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=600, headers=admin_headers()) as http:
        FakeEmbed(app, "tickets").install()
        ds = upload(http, "tickets", jsonl_bytes(rows), labels=DOMAIN, epsilon=40).json()
        spec = task_spec("t", "tickets", generation={**FAST, "clusters": 2}, shots=2)
        assert http.post("/admin/tasks", json=spec).status_code == 201
        dry = http.post("/admin/tasks/t/demos", json={"dry_run": True})
        warm = http.post("/admin/tasks/t/demos", json={"wait": True})
        cached = http.get("/admin/tasks/t/demos").json()
        budget = http.get("/admin/budget/tickets").json()
        store, meta = app.state.store, app.state.store.get_dataset(ds["id"])
        task = app.state.tasks._admin["t"]
        key = cache_key(task, dataclasses.replace(meta, id="ds_fixed"), app.state.demos.generators.generator_id(task))
        keys = app.state.demos.warmup._release_keys(task, DOMAIN, None)
        sizes = {lab: store.get_cluster_release(meta.id, k)["noisy_sizes"] for lab, k in keys.items()}
        payload = cached["demonstrations"]
        for label, used in payload["clusters"].items():  # what is shown is the stored DP release
            assert all(c["noisy_size"] == round(sizes[label][c["cluster"]], 2) for c in used)
        assert CANARY not in json.dumps([dry.json(), warm.json(), cached, budget])
        return {"status": (dry.status_code, warm.status_code), "key": key, "sizes": sizes,
                "ledger": [(e["kind"], e["partition"], e["event"]) for e in budget["ledger"]],
                "partitions": sorted(budget["partitions"]), "decisions": payload["decisions"],
                "clusters": payload["clusters"], "dry_clusters": dry.json().get("clusters"),
                "demos": [(d["label"], d.get("cluster"), d.get("cluster_size")) for d in payload["demos"]]}


def test_neighbouring_datasets_differ_only_through_the_cluster_sizes(tmp_path, monkeypatch, env):
    """D vs D plus one unit of a declared label: with the noise set to zero, the only difference
    that reaches the process's outputs (or its store) is that unit's count in its cluster's size."""
    monkeypatch.setattr(proxy.budget, "Noise", _ZeroNoise)
    monkeypatch.setattr(proxy.serving.clusters, "Noise", _ZeroNoise)
    d = dataset_rows(30)
    d_plus = d + [{"text": f"the one rare record {CANARY}", "label": EMPTY}]
    a = _released(tmp_path, "d", d, env)
    b = _released(tmp_path, "d_plus", d_plus, env)
    assert a["status"] == b["status"] == (200, 200)
    assert sorted(a["sizes"][EMPTY]) == [0.0, 0.0] and sorted(b["sizes"][EMPTY]) == [0.0, 1.0]  # the one difference
    assert {k: v for k, v in a["sizes"].items() if k != EMPTY} == {k: v for k, v in b["sizes"].items() if k != EMPTY}
    for k in ("key", "ledger", "partitions", "decisions", "clusters", "dry_clusters", "demos"):
        assert a[k] == b[k], k
    assert any("#" in p for _, p, _ in a["ledger"])
    assert a["decisions"][EMPTY]["decision"] == "public" and EMPTY not in a["clusters"]


def test_plan_spreads_shots_over_usable_clusters_and_composes_them_in_parallel():
    cfg = GenerationConfig(mode="fixed", num_subsets=2, shots_per_subset=1, max_tokens=3, epsilon=1.0)

    def rel(sizes):
        return {"A": LabelClusters("A", np.zeros((len(sizes), 2)), sizes)}

    three, parts = plan_clusters(cfg, rel([50.0, 40.0, 30.0]), ["A"], 3, 1e-5)
    assert sorted(three.labels) == ["A#0", "A#1", "A#2"] and all(lp.shots == 1 for lp in three.labels.values())
    one, _ = plan_clusters(cfg, rel([50.0, 0.0, 0.0]), ["A"], 1, 1e-5)
    assert three.epsilon() == pytest.approx(one.epsilon(), rel=0.05)  # parallel: 3 shots cost one
    cycled, _ = plan_clusters(cfg, rel([50.0, 1.0, 40.0]), ["A"], 3, 1e-5)  # cluster 1 is below M*N
    assert {k: lp.shots for k, lp in cycled.labels.items()} == {"A#0": 2, "A#2": 1}
    none, parts = plan_clusters(cfg, rel([1.0, -3.0]), ["A"], 2, 1e-5)
    assert list(none.labels) == ["A"] and none.labels["A"].decision == "public" and parts["A"].cluster is None


def test_creation_refuses_what_cannot_run(tmp_path, env, monkeypatch):
    app = _serve(tmp_path, env)
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=600, headers=admin_headers()) as http:
        upload(http, "qs", jsonl_bytes(dataset_rows(5)), labels=LABELS)
        for gen in ({"clusters": 2, "public_only": True}, {"clusters": 33}, {"clusters": -1},
                    {"clusters": 2, "clustering": "kmeans"}):
            r = http.post("/admin/tasks", json=task_spec("t", "qs", generation={**FAST, **gen}))
            assert "\n" not in assert_openai_error(r, 400)["message"]
        monkeypatch.setattr(proxy.serving.clusters, "embedder_problem", lambda: "no embedder here")
        r = http.post("/admin/tasks", json=task_spec("t", "qs", generation={**FAST, "clusters": 2}))
        assert "no embedder here" in assert_openai_error(r, 400)["message"]
        assert http.post("/admin/tasks", json=task_spec("t", "qs", generation=FAST)).status_code == 201
        assert http.get("/admin/budget/qs").json()["ledger"] == []


def test_a_warm_up_whose_embedder_cannot_run_is_refused_before_any_charge(tmp_path, env):
    """The task was accepted while the embedder was installed; if it cannot run at warm-up time the
    warm-up answers 501 with the embedder's reason and the ledger stays empty."""
    app = _serve(tmp_path, env)
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=600, headers=admin_headers()) as http:
        assert upload(http, "qs", jsonl_bytes(dataset_rows(40)), labels=LABELS, epsilon=50).status_code == 201
        assert http.post("/admin/tasks", json=task_spec("t", "qs", generation={**FAST, "clusters": 2})).status_code == 201

        class Gone(FakeEmbed):
            def unavailable(self):
                return "the package went away"

        Gone(app, "qs").install()
        err = assert_openai_error(http.post("/admin/tasks/t/demos", json={"wait": True}), 501)
        assert "the package went away" in err["message"] and "nothing was charged" in err["message"]
        assert http.get("/admin/budget/qs").json()["ledger"] == []


def test_cache_key_changes_only_when_clusters_are_on():
    meta = DatasetMeta(id="ds_1", rows=3, created_at=0.0, budget_epsilon=4.0, budget_delta=1e-5, labels=LABELS,
                       name="qs", version=1)
    plain = stored_task(task_spec("t", "qs"))  # a task stored before clusters (and later settings) existed
    old = legacy_cache_key(plain, meta, "g")  # the key as it was computed before clusters existed
    assert cache_key(plain, meta, "g") == old
    public_off = TaskConfig.model_validate(task_spec("t", "qs", generation={**plain.generation.model_dump(),
                                                                            "clustering": "public"}))
    assert cache_key(public_off, meta, "g") == old
    on = TaskConfig.model_validate(task_spec("t", "qs", generation={**plain.generation.model_dump(), "clusters": 4}))
    assert cache_key(on, meta, "g") != old


def test_cli_options_round_trip_and_budget_pages_show_cluster_partitions(tmp_path, env):
    app = _serve(tmp_path, env)
    cli_env = {"DPICL_URL": "", "DPICL_ADMIN_KEY": ADMIN_KEY, "COLUMNS": "200"}
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=600, headers=admin_headers()) as http:
        cli_env["DPICL_URL"] = srv.url
        FakeEmbed(app, "qs").install()
        upload(http, "qs", jsonl_bytes(dataset_rows(30)), labels=LABELS, epsilon=30)

        def run(*args):
            res = CliRunner().invoke(cli, list(args), env=cli_env)
            assert "Traceback" not in res.output + res.stderr
            return res

        bad = run("tasks", "add", "t", "--dataset", "qs", "--instruction", "Classify.", "--clustering", "kmeans")
        assert bad.exit_code != 0 and len([ln for ln in bad.stderr.splitlines() if ln.strip()]) == 1
        big = run("tasks", "add", "t", "--dataset", "qs", "--instruction", "Classify.", "--clusters", "33")
        assert big.exit_code != 0 and [ln for ln in big.stderr.splitlines() if ln.strip()][0].startswith("error:")
        assert len([ln for ln in big.stderr.splitlines() if ln.strip()]) == 1 and "clusters" in big.stderr
        added = run("tasks", "add", "t", "--dataset", "qs", "--instruction", "Classify.", "--clusters", "3",
                    "--clustering", "public", "-g", "mode=fixed", "-g", "max_tokens=3", "-g", "num_subsets=2",
                    "-g", "shots_per_subset=1", "-g", "top_k=8", "--json")
        assert added.exit_code == 0, added.stderr
        gen = json.loads(run("tasks", "show", "t", "--json").stdout)["generation"]
        assert (gen["clusters"], gen["clustering"], gen["mode"]) == (3, "public", "fixed")
        warm = run("tasks", "warm", "t", "--no-follow", "--json")
        assert warm.exit_code == 0, warm.stderr
        for _ in range(600):
            view = http.get("/admin/warmups").json()["data"][0]
            if view["state"] in ("done", "failed"):
                break
            time.sleep(0.2)
        assert view["state"] == "done", view
        dry = run("tasks", "warm", "t", "--dry-run")  # the table output lists the clusters, not only --json
        dry_json = json.loads(run("tasks", "warm", "t", "--dry-run", "--json").stdout)
        assert dry.exit_code == 0 and dry_json["clusters"] and "clusters (DP sizes)" in dry.stdout
        for label, used in dry_json["clusters"].items():
            for c in used:
                assert any(ln.split() == ["│", label, "│", str(c["cluster"]), "│", f"{c['noisy_size']:.3f}", "│",
                                          str(c["shots"]), "│"] for ln in dry.stdout.splitlines()), dry.stdout
        demos = run("tasks", "demos", "t")
        assert demos.exit_code == 0 and "cluster" in demos.stdout and "noisy size" in demos.stdout
        shown = run("budget", "show", "qs")
        assert shown.exit_code == 0 and "partitions" in shown.stdout and "#" in shown.stdout
        assert run("budget", "show").exit_code == 0
        page = http.get("/admin/budget/qs").json()
        assert any("#" in p for p in page["partitions"]) and CANARY not in demos.stdout + shown.stdout
