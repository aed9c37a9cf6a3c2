"""Issue 22.1: ``max_prompt_tokens: auto`` derives a task's prompt width from a DP release of the
units' row lengths (charged once per dataset version and generator, before rows are read), and
reports the DP share of units that fit; the neighbour D + one unit with a very long row moves
only the released (noisy) histogram, never the ledger or anything exact."""

from __future__ import annotations

import dataclasses
import json

import httpx
import pytest

import proxy.budget
from aggregation.quantile import WIDTH_GRID, WIDTH_SIGMA, WidthRelease
from proxy.app import create_app
from proxy.serving.demos import cache_key
from proxy.serving.tasks import task_prompt
from proxy.serving.widths import from_release
from tests.test_app_support import (  # noqa: F401 - fixtures
    CANARY, LABELS, LiveServer, admin_headers, dataset_rows, fake_upstream, jsonl_bytes, make_config, task_spec,
    tiny_model_dir, upload,
)
from tests.test_privacy_neighbours import _ZeroNoise

FAST = {"mode": "fixed", "num_subsets": 2, "shots_per_subset": 1, "max_tokens": 3, "top_k": 8, "sigma": 1.5}
AUTO = {**FAST, "max_prompt_tokens": "auto"}
WIDTH_EVENT = {"type": "GaussianDpEvent", "noise_multiplier": WIDTH_SIGMA}


@pytest.fixture
def http(tmp_path, fake_upstream, tiny_model_dir):
    app = create_app(make_config(f"sqlite:///{tmp_path}/s.db", fake_upstream.base_url, tiny_model_dir))
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=300, headers=admin_headers()) as client:
        yield app, client


def _derived(app, name: str, ds_id: str) -> dict:
    """The width recomputed from the stored release and public text only."""
    task = app.state.tasks._admin[name]
    gen = app.state.demos.generators
    release = WidthRelease.from_dict(app.state.store.get_width_release(ds_id, gen.generator_id(task)))
    return from_release(task, gen.source(task), task_prompt(task), list(LABELS), release).to_dict()


def test_auto_width_is_released_once_and_reported(http):
    app, client = http
    ds = upload(client, "d", jsonl_bytes(dataset_rows(400)), epsilon=20).json()  # >> the noise
    client.post("/admin/tasks", json=task_spec("a", "d", generation=AUTO))
    client.post("/admin/tasks", json=task_spec("b", "d", generation={**AUTO, "shots_per_subset": 2}))
    client.post("/admin/tasks", json=task_spec("h", "d", generation={**FAST, "max_prompt_tokens": 300}))
    assert client.get("/admin/tasks/a").json()["prompt_width"]["width"] is None  # not released yet
    assert client.get("/admin/tasks/h").json()["prompt_width"] == {
        "width": 300, "auto": False, "quantile": None, "p": None, "fit_share": None}
    dry_auto = client.post("/admin/tasks/a/demos", json={"dry_run": True}).json()
    dry_hand = client.post("/admin/tasks/h/demos", json={"dry_run": True}).json()
    assert dry_auto["estimate"] is True and dry_auto["prompt_width"]["width"] is None
    assert dry_auto["epsilon_cost"] > dry_hand["epsilon_cost"]  # the release is priced in
    assert client.get("/admin/budget/d").json()["events"] == 0  # pricing charged nothing

    first = client.post("/admin/tasks/a/demos", json={"wait": True}).json()
    assert first["state"] == "done", first
    width = first["result"]["prompt_width"]
    assert width == _derived(app, "a", ds["id"]) and width["auto"] is True and width["p"] == 0.95
    assert width["quantile"] in WIDTH_GRID and 0.0 <= width["fit_share"] <= 1.0
    assert first["epsilon_cost"] == pytest.approx(client.get("/admin/budget/d").json()["epsilon_spent"])
    assert client.get("/admin/tasks/a").json()["prompt_width"] == width  # tasks show
    # A second auto task on the same version and generator reuses the release (free).
    second = client.post("/admin/tasks/b/demos", json={"wait": True}).json()
    assert second["result"]["prompt_width"]["quantile"] == width["quantile"]
    assert second["result"]["prompt_width"]["width"] > width["width"]  # N = 2 examples
    client.post("/admin/tasks/h/demos", json={"wait": True})
    ledger = client.get("/admin/budget/d").json()["ledger"]
    kinds = [e["kind"] for e in ledger]
    assert kinds[:2] == ["histogram", "width"] and set(kinds[2:]) == {"warmup"}  # one release for all
    assert (ledger[1]["partition"], ledger[1]["event"]) == ("*", WIDTH_EVENT)
    dry = client.post("/admin/tasks/b/demos", json={"dry_run": True}).json()
    assert dry["estimate"] is False and dry["prompt_width"] == second["result"]["prompt_width"]


def test_auto_width_refused_by_budget_charges_nothing(http):
    app, client = http
    upload(client, "d", jsonl_bytes(dataset_rows(30)), epsilon=5)
    assert client.post("/admin/tasks", json=task_spec("a", "d", generation=AUTO)).status_code == 201
    # Lowered after the task was accepted (a task's epsilon above the whole budget is refused at creation).
    assert client.put("/admin/budget/d", json={"epsilon": 0.05}).status_code == 200
    out = client.post("/admin/tasks/a/demos", json={"wait": True})
    assert out.status_code == 402, out.text
    assert client.get("/admin/budget/d").json()["events"] == 0
    ds_id = app.state.store.list_datasets()[0].id
    assert app.state.store.get_width_release(ds_id, app.state.demos.generators.generator_id(
        app.state.tasks._admin["a"])) is None


def _released(tmp_path, name, rows, fake, model_dir) -> dict:
    cfg = make_config(f"sqlite:///{tmp_path / name}.db", fake.base_url, model_dir, client_tasks=["*"])
    app = create_app(cfg)
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=300, headers=admin_headers()) as http:
        ds = upload(http, "tickets", jsonl_bytes(rows), epsilon=20).json()
        assert http.post("/admin/tasks", json=task_spec("t", "tickets", generation=AUTO)).status_code == 201
        dry = http.post("/admin/tasks/t/demos", json={"dry_run": True}).json()
        warm = http.post("/admin/tasks/t/demos", json={"wait": True}).json()
        shown = http.get("/admin/tasks/t").json()
        budget = http.get("/admin/budget/tickets").json()
        task = app.state.tasks._admin["t"]
        gen = app.state.demos.generators.generator_id(task)
        meta = app.state.store.get_dataset(ds["id"])
        assert CANARY not in json.dumps([dry, warm, shown, budget])
        return {
            "dry": {k: v for k, v in dry.items() if k not in ("key", "dataset_id")},
            "ledger": [(e["kind"], e["partition"], e["event"]) for e in budget["ledger"]],
            "key": cache_key(task, dataclasses.replace(meta, id="ds_fixed"), gen),
            "release": app.state.store.get_width_release(ds["id"], gen),
            "width": warm["result"]["prompt_width"], "shown": shown["prompt_width"],
            "derived": _derived(app, "t", ds["id"]),
        }


def test_a_very_long_unit_moves_only_the_noisy_release(tmp_path, monkeypatch, fake_upstream, tiny_model_dir):
    monkeypatch.setattr(proxy.budget, "Noise", _ZeroNoise)  # see the difference exactly
    d = dataset_rows(30)
    d_plus = d + [{"text": f"{CANARY} " + "word " * 3000, "label": LABELS[0]}]
    a = _released(tmp_path, "d", d, fake_upstream, tiny_model_dir)
    b = _released(tmp_path, "d_plus", d_plus, fake_upstream, tiny_model_dir)
    # Pricing reads no row (its admin-only cost estimate uses the row count, docs/privacy.md).
    assert a["dry"]["prompt_width"] == b["dry"]["prompt_width"] == {
        "width": None, "auto": True, "quantile": None, "p": 0.95, "fit_share": None}
    # Same entries; the releases' events are identical, and the warm-ups differ only through the
    # (here noise-free) label count of the long unit's label, itself a charged release.
    assert [(k, p) for k, p, _ in a["ledger"]] == [(k, p) for k, p, _ in b["ledger"]]
    assert a["ledger"][:2] == b["ledger"][:2] and a["ledger"][1] == ("width", "*", WIDTH_EVENT)
    assert a["key"] == b["key"]
    bins_a, bins_b = a["release"]["bins"], b["release"]["bins"]
    assert [y - x for x, y in zip(bins_a, bins_b)] == [0.0] * len(WIDTH_GRID) + [1.0]  # overflow bin only
    for r in (a, b):  # what is reported is post-processing of the release and public text
        assert r["width"] == r["shown"] == r["derived"]


def test_task_view_of_a_released_auto_width_never_loads_the_model(tmp_path, monkeypatch, fake_upstream,
                                                                  tiny_model_dir):
    """GET /admin/tasks/{name} (and the dry run) derive the width from the stored release with the
    generator's tokenizer alone: a fresh process on the same store shows the same width and never
    calls the model loader."""
    import aggregation.sources.local
    import aggregation.sources.models
    from aggregation.sources.local import TokenizerCounter

    url = f"sqlite:///{tmp_path}/s.db"
    first = create_app(make_config(url, fake_upstream.base_url, tiny_model_dir))
    with LiveServer(first) as srv, httpx.Client(base_url=srv.url, timeout=300, headers=admin_headers()) as client:
        upload(client, "d", jsonl_bytes(dataset_rows(30)), epsilon=20)
        assert client.post("/admin/tasks", json=task_spec("a", "d", generation=AUTO)).status_code == 201
        warm = client.post("/admin/tasks/a/demos", json={"wait": True}).json()
        assert warm["state"] == "done", warm
        width = warm["result"]["prompt_width"]
        source = first.state.demos.generators.source(first.state.tasks._admin["a"])
    counting = TokenizerCounter(source.tokenizer)  # the same numbers as the loaded model's counting
    for text, prefix in (("Question: where is Paris?", ""), ("x", "Answer type: location\n"), ("", "")):
        assert counting.count_tokens(text, prefix) == source.count_tokens(text, prefix)

    loads: list[str] = []

    def no_model(*args, **kwargs):
        loads.append("model")
        raise RuntimeError("the model must not be loaded to show a task")

    for module in (aggregation.sources.local, aggregation.sources.models):
        monkeypatch.setattr(module, "load_model", no_model)
    second = create_app(make_config(url, fake_upstream.base_url, tiny_model_dir))  # a fresh process's state
    with LiveServer(second) as srv, httpx.Client(base_url=srv.url, timeout=300, headers=admin_headers()) as client:
        shown = client.get("/admin/tasks/a")
        dry = client.post("/admin/tasks/a/demos", json={"dry_run": True})
    assert shown.status_code == 200 and shown.json()["prompt_width"] == width and width["width"] is not None
    assert dry.status_code == 200 and dry.json()["prompt_width"] == width
    assert loads == []

    def no_tokenizer(*args, **kwargs):
        raise FileNotFoundError("no model directory here")

    monkeypatch.setattr(aggregation.sources.models, "load_tokenizer", no_tokenizer)
    monkeypatch.setattr(aggregation.sources.local, "load_tokenizer", no_tokenizer)
    third = create_app(make_config(url, fake_upstream.base_url, tiny_model_dir))
    with LiveServer(third) as srv, httpx.Client(base_url=srv.url, timeout=300, headers=admin_headers()) as client:
        view = client.get("/admin/tasks/a")  # a server without the tokenizer still shows the task
    assert view.status_code == 200 and view.json()["prompt_width"] is None and loads == []
