"""The admin CLI (``dpicl datasets|budget|tasks|keys|jobs``) against a live server, and its errors:
an unreachable server, a wrong key or a 4xx is one line on stderr and a non-zero exit."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from proxy.app import create_app
from proxy.cli import app as cli
from tests.test_app_support import (  # noqa: F401 - fixtures
    ADMIN_KEY, CANARY, CLIENT_KEY, LABELS, TINY_GENERATION, LiveServer, dataset_rows, fake_upstream, free_port, jsonl_bytes,
    make_config, tiny_model_dir,
)


@pytest.fixture
def live(tmp_path, fake_upstream, tiny_model_dir):
    cfg = make_config(f"sqlite:///{tmp_path}/s.db", fake_upstream.base_url, tiny_model_dir, client_tasks=["*"])
    app = create_app(cfg)
    with LiveServer(app) as srv:
        yield srv, tmp_path


def run(url: str, *args: str, key: str | None = ADMIN_KEY, input: str | None = None, columns: int = 200):
    env = {"DPICL_URL": url, "DPICL_ADMIN_KEY": key or "", "COLUMNS": str(columns)}
    result = CliRunner().invoke(cli, list(args), env=env, input=input)
    assert "Traceback" not in result.output + result.stderr
    return result


def ok_json(url: str, *args: str):
    result = run(url, *args, "--json")
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


def one_error_line(result) -> str:
    assert result.exit_code != 0
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def test_datasets_budget_tasks_round_trip(live):
    srv, tmp = live
    data = tmp / "rows.jsonl"
    data.write_bytes(jsonl_bytes(dataset_rows(30)))
    up = ok_json(srv.url, "datasets", "upload", str(data), "--name", "qs", "--epsilon", "5",
                 "--labels", ",".join(LABELS))
    assert up["rows"] == 90 and up["name"] == "qs"
    listed = ok_json(srv.url, "datasets", "list")
    assert [d["id"] for d in listed["data"]] == [up["id"]]
    table = run(srv.url, "datasets", "list")
    assert table.exit_code == 0 and up["id"] in table.stdout and "qs" in table.stdout
    assert ok_json(srv.url, "datasets", "show", up["id"])["rows"] == 90

    run(srv.url, "budget", "set", "qs", "--epsilon", "6")
    budgets = ok_json(srv.url, "budget", "show")["data"]
    mine = [b for b in budgets if b.get("name") == "qs"]
    assert mine and mine[0].get("epsilon_budget", mine[0].get("budget_epsilon")) == 6
    shown = run(srv.url, "budget", "show", "qs")
    assert shown.exit_code == 0 and "6.000" in shown.stdout

    gen = [f"-g{k}={v}" for k, v in TINY_GENERATION.items()]
    added = run(srv.url, "tasks", "add", "cli-task", "--dataset", "qs", "--instruction", "Classify the question.",
                "--upstream", "fake-model", "--label", "LOC", "--label", "NUM", "--label-word", "LOC=location", *gen)
    assert added.exit_code == 0, added.stderr
    spec = ok_json(srv.url, "tasks", "show", "cli-task")
    assert spec["labels"] == ["LOC", "NUM"] and spec["generation"]["max_tokens"] == TINY_GENERATION["max_tokens"]
    assert spec["label_words"] == {"LOC": "location"}
    # tasks show reports the prompt width a warm-up would use (hand-set here: public configuration).
    assert spec["prompt_width"] == {"width": 256, "auto": False, "quantile": None, "p": None, "fit_share": None}
    assert re.search(r"prompt_width.*width=256, auto=no", run(srv.url, "tasks", "show", "cli-task").stdout)
    assert "cli-task" in run(srv.url, "tasks", "list").stdout

    dry = ok_json(srv.url, "tasks", "warm", "cli-task", "--dry-run")
    assert dry["dry_run"] is True and dry["fits"] is True
    assert ok_json(srv.url, "tasks", "demos", "cli-task")["cached"] is False
    warmed = run(srv.url, "tasks", "warm", "cli-task", "--interval", "0.2")
    assert warmed.exit_code == 0, warmed.stderr
    assert re.search(r"warm-up \S+ done: epsilon cost \d", warmed.stdout), warmed.stdout  # followed to the end
    demos = ok_json(srv.url, "tasks", "demos", "cli-task")
    assert demos["cached"] is True
    assert sorted(d["label"] for d in demos["demonstrations"]["demos"]) == ["LOC", "NUM"]
    spent = ok_json(srv.url, "budget", "show", "qs")
    assert (spent.get("epsilon_spent", spent.get("spent_epsilon")) or 0) > 0
    assert CANARY not in warmed.stdout + run(srv.url, "tasks", "demos", "cli-task").stdout  # text from DP noise only
    ledger = run(srv.url, "budget", "show", "qs").stdout
    # Each entry names the label it charged and why (the task), not only an epsilon.
    assert "label / partition" in ledger and "reason" in ledger
    assert re.search(r"warmup\s+│\s+(LOC|NUM)\s+│", ledger) and "task cli-task demos" in ledger, ledger

    deleted = run(srv.url, "datasets", "delete", up["id"], "--yes")
    assert deleted.exit_code == 0
    assert ok_json(srv.url, "datasets", "list")["data"] == []


def test_client_keys_created_listed_and_revoked(live):
    srv, tmp = live
    created = run(srv.url, "keys", "create", "app2", "--task", "*", "--no-passthrough")
    assert created.exit_code == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("dpk-") and len(secret) > 40
    with httpx.Client(base_url=srv.url, timeout=30) as http:
        auth = {"Authorization": f"Bearer {secret}"}
        assert http.get("/v1/models", headers=auth).status_code == 200
        assert http.get("/admin/datasets", headers=auth).status_code == 403  # a client key is not an admin key

        listed = ok_json(srv.url, "keys", "list")["data"]
        by_name = {k["name"]: k for k in listed}
        assert by_name["app1"]["source"] == "config" and by_name["app2"]["source"] == "admin"
        assert by_name["app2"]["passthrough"] is False and by_name["app2"]["tasks"] == ["*"]
        assert secret not in json.dumps(listed)
        assert secret.encode() not in (tmp / "s.db").read_bytes()  # only its hash is stored

        again = run(srv.url, "keys", "create", "app2")
        assert "409" in one_error_line(again)
        assert "config file" in one_error_line(run(srv.url, "keys", "delete", "app1"))
        assert run(srv.url, "keys", "delete", "app2").exit_code == 0
        assert http.get("/v1/models", headers=auth).status_code == 401
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {CLIENT_KEY}"}).status_code == 200
        assert "404" in one_error_line(run(srv.url, "keys", "delete", "app2"))


def test_key_api_validates_and_hides_secrets(live):
    srv, _ = live
    with httpx.Client(base_url=srv.url, timeout=30, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as http:
        bad = http.post("/admin/keys", json={"name": "no spaces allowed", "tasks": []})
        assert bad.status_code == 400 and "name" in bad.json()["error"]["message"]
        assert http.post("/admin/keys", json={"name": "x", "extra": 1}).status_code == 400
        assert http.post("/admin/keys", json={"name": "x", "passthrough": "yes"}).status_code == 400  # strict
        made = http.post("/admin/keys", json={"name": "k1", "tasks": ["*", "*"]}).json()
        assert made["tasks"] == ["*"] and made["key"].startswith(made["key_prefix"])
    # A key for a task that does not exist would only fail at the client's first request.
    line = one_error_line(run(srv.url, "keys", "create", "k2", "--task", "no-such-task"))
    assert "400" in line and "no-such-task" in line


@pytest.mark.parametrize("args", [["jobs", "list"], ["datasets", "list"], ["budget", "show"], ["keys", "list"],
                                  ["tasks", "warm", "t"]])
def test_unreachable_server_is_one_line(args):
    result = run(f"http://127.0.0.1:{free_port()}", *args)
    assert "cannot reach" in one_error_line(result)
    assert result.exit_code == 1


def test_wrong_key_missing_key_and_404_are_one_line(live):
    srv, _ = live
    wrong = run(srv.url, "jobs", "list", key="not-the-admin-key")
    assert "401" in one_error_line(wrong) and "DPICL_ADMIN_KEY" in one_error_line(wrong)
    missing = run(srv.url, "datasets", "list", key=None)
    assert "DPICL_ADMIN_KEY" in one_error_line(missing) and missing.exit_code == 2
    assert "404" in one_error_line(run(srv.url, "tasks", "show", "nope"))
    assert "404" in one_error_line(run(srv.url, "jobs", "show", "nope"))


def test_job_validation_names_only_the_asked_kind(live):
    srv, _ = live
    with httpx.Client(base_url=srv.url, timeout=30, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as http:
        pe = http.post("/admin/jobs", json={"kind": "pe", "dataset": "d", "iterations": 0}).json()["error"]["message"]
        assert "iterations" in pe and "steps" not in pe and "dpsgd" not in pe.lower()
        sgd = http.post("/admin/jobs", json={"kind": "dpsgd", "dataset": "d", "steps": 0}).json()["error"]["message"]
        assert "steps" in sgd and "iterations" not in sgd and "PEJob" not in sgd
    submit = run(srv.url, "jobs", "submit", "--kind", "pe", "--dataset", "d", "-p", "population=0")
    line = one_error_line(submit)
    assert "population" in line and "dpsgd" not in line.lower()


def test_tasks_wait_for_their_dataset_only_when_told(live):
    srv, tmp = live
    task = ["--instruction", "Classify.", "--upstream", "fake-model"]
    line = one_error_line(run(srv.url, "tasks", "add", "early", "--dataset", "later", *task))
    assert "400" in line and "later" in line and "--allow-missing-dataset" in line
    added = run(srv.url, "tasks", "add", "early", "--dataset", "later", *task, "--allow-missing-dataset")
    assert added.exit_code == 0 and "waiting" in added.stdout, added.stderr
    listing = run(srv.url, "tasks", "list")
    assert "early" in listing.stdout  # in the table, and below it why it cannot be warmed yet
    assert "early: waiting: dataset 'later' is not uploaded yet" in listing.stdout.splitlines()
    data = tmp / "rows.jsonl"
    data.write_bytes(jsonl_bytes(dataset_rows(5)))
    assert run(srv.url, "datasets", "upload", str(data), "--name", "later", "--labels", ",".join(LABELS)).exit_code == 0
    assert ok_json(srv.url, "tasks", "show", "early")["status"] == "ready"


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_numbers_are_one_line_errors(tmp_path, value):
    """These used to end in a 40-line traceback from the JSON encoder; nothing is sent now."""
    url = f"http://127.0.0.1:{free_port()}"  # never reached: the check comes first
    data = tmp_path / "rows.jsonl"
    data.write_bytes(jsonl_bytes(dataset_rows(2)))
    for args in (["tasks", "add", "t", "--dataset", "d", "--instruction", "x", "--epsilon", value],
                 ["jobs", "submit", "--kind", "pe", "--dataset", "d", "--epsilon", value],
                 ["budget", "set", "d", "--epsilon", value],
                 ["budget", "set", "d", "--epsilon", "1", "--delta", value],
                 ["datasets", "upload", str(data), "--name", "d", "--epsilon", value],
                 ["account", "--mode", "fixed", "--sample-size", "20", "--pool-size", "300", "--tokens", "10",
                  "--delta", "1e-5", "--sigma", value]):
        result = run(url, *args)
        assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
        line = one_error_line(result)
        assert "finite" in line and "cannot reach" not in line, (args, line)
    for args in (["jobs", "submit", "--kind", "pe", "--dataset", "d", "-p", "sigma=NaN"],
                 ["tasks", "add", "t", "--dataset", "d", "--instruction", "x", "-g", "clip=Infinity"]):
        line = one_error_line(run(url, *args))
        assert "finite" in line and ("sigma" in line or "generation.clip" in line), (args, line)


def test_jobs_submit_quiet_prints_only_the_id(live):
    # The README's jobs section captures ids with JOB=$(dpicl jobs submit ... -q): stdout must be
    # the id alone (the charge goes to stderr), and the id must name the job.
    srv, tmp = live
    data = tmp / "rows.jsonl"
    data.write_bytes(jsonl_bytes(dataset_rows(20)))
    assert run(srv.url, "datasets", "upload", str(data), "--name", "qs", "--epsilon", "5",
               "--labels", ",".join(LABELS)).exit_code == 0
    result = run(srv.url, "jobs", "submit", "--kind", "pe", "--dataset", "qs", "--epsilon", "1", "-q",
                 "-p", "iterations=1", "-p", "population=2", "-p", "num_samples=3", "-p", "max_new_tokens=2",
                 "-p", 'prompt={"instruction": "Write a question.", "input_prefix": "Question:", '
                       '"label_prefix": "Answer type:"}')
    assert result.exit_code == 0, result.stderr
    job_id = result.stdout.strip()
    assert job_id and "\n" not in job_id and " " not in job_id
    assert "epsilon charged" in result.stderr
    shown = json.loads(run(srv.url, "jobs", "show", job_id).stdout)
    assert shown["id"] == job_id
    run(srv.url, "jobs", "cancel", job_id)


def test_data_command_writes_a_sample(tmp_path: Path):
    out = tmp_path / "trec.jsonl"
    result = CliRunner().invoke(cli, ["data", "trec", "-o", str(out), "--rows", "40"])
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 40 and all(set(r) == {"text", "label"} and r["text"] for r in rows)
    assert not (tmp_path / "trec.jsonl.part").exists()


def test_data_command_holds_out_disjoint_test_rows(tmp_path: Path):
    # The README's jobs section evaluates on rows that were never uploaded: the split must be
    # disjoint, cover every row, be reproducible by seed, and refuse a split that leaves no pool.
    def split(seed: str) -> tuple[list[dict], list[dict]]:
        pool, test = tmp_path / f"pool{seed}.jsonl", tmp_path / f"test{seed}.jsonl"
        result = CliRunner().invoke(cli, ["data", "trec", "-o", str(pool), "--test-output", str(test),
                                          "--test-rows", "50", "--seed", seed])
        assert result.exit_code == 0, result.stderr
        return ([json.loads(x) for x in pool.read_text().splitlines()],
                [json.loads(x) for x in test.read_text().splitlines()])

    pool, test = split("0")
    everything = [json.loads(x) for x in (CliRunner().invoke(cli, ["data", "trec", "-o", str(tmp_path / "all.jsonl")])
                                          and (tmp_path / "all.jsonl").read_text().splitlines())]
    assert len(test) == 50 and len(everything) - 60 < len(pool) + len(test) <= len(everything)
    key = lambda r: (r["text"], r["label"])  # noqa: E731
    assert set(map(key, pool + test)) == set(map(key, everything))  # only repeats of test texts are gone
    assert not {r["text"] for r in test} & {r["text"] for r in pool}  # TREC repeats questions: none leak
    assert split("0") == (pool, test) and split("1")[1] != test
    bad = CliRunner().invoke(cli, ["data", "trec", "-o", str(tmp_path / "p.jsonl"), "--rows", "10",
                                   "--test-output", str(tmp_path / "t.jsonl"), "--test-rows", "10"])
    assert bad.exit_code != 0 and "leaves no rows" in bad.stderr and "Traceback" not in bad.stderr


def test_server_starts_with_its_store_down(fake_upstream):
    """Loading the stored client keys at start-up must not stop a server whose Redis is down:
    it starts, readiness says 503, and the keys are loaded by the periodic refresh later."""
    cfg = make_config(f"redis://127.0.0.1:{free_port()}/0", fake_upstream.base_url, None)
    with LiveServer(create_app(cfg)) as srv:
        assert httpx.get(srv.url + "/health/readiness", timeout=30).status_code == 503


def test_warm_over_budget_is_one_line_and_reads_nothing(live):
    srv, tmp = live
    data = tmp / "rows.jsonl"
    data.write_bytes(jsonl_bytes(dataset_rows(10)))
    assert run(srv.url, "datasets", "upload", str(data), "--name", "small", "--epsilon", "2",
               "--labels", ",".join(LABELS)).exit_code == 0
    gen = [f"-g{k}={v}" for k, v in TINY_GENERATION.items()]
    task = ["--dataset", "small", "--instruction", "Classify.", "--upstream", "fake-model", *gen]
    # A task epsilon above the dataset's whole budget is refused at creation, not at warm-up.
    line = one_error_line(run(srv.url, "tasks", "add", "big", *task, "--epsilon", "2.5"))
    assert "400" in line and "whole budget" in line
    assert run(srv.url, "tasks", "add", "big", *task, "--epsilon", "2").exit_code == 0
    assert run(srv.url, "budget", "set", "small", "--epsilon", "0.05").exit_code == 0  # later: the admin's right
    # The dry run prints the price and exits 1: a script can test it before warming.
    dry = run(srv.url, "tasks", "warm", "big", "--dry-run")
    assert dry.exit_code == 1 and "fits" in dry.stdout and "does not fit" in one_error_line(dry)
    line = one_error_line(run(srv.url, "tasks", "warm", "big"))
    assert "402" in line and "budget" in line and CANARY not in line
    assert ok_json(srv.url, "tasks", "demos", "big")["cached"] is False


def test_names_or_ids_everywhere_and_confirmations(live):
    srv, tmp = live
    data = tmp / "rows.jsonl"
    data.write_bytes(jsonl_bytes(dataset_rows(10)))
    labels = ",".join(LABELS)
    v1 = ok_json(srv.url, "datasets", "upload", str(data), "--name", "qs", "--labels", labels)
    v2 = ok_json(srv.url, "datasets", "upload", str(data), "--name", "qs", "--labels", labels)
    assert ok_json(srv.url, "datasets", "show", "qs")["id"] == v2["id"]  # a name: its newest version
    assert ok_json(srv.url, "datasets", "show", v1["id"])["version"] == 1
    assert ok_json(srv.url, "budget", "show", v1["id"])["name"] == "qs"  # an id: its name's budget
    with httpx.Client(base_url=srv.url, timeout=30, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as http:
        assert http.get("/admin/datasets/qs").json()["id"] == v2["id"]  # the API takes names too
        assert http.get(f"/admin/budget/{v2['id']}").json()["name"] == "qs"
        assert "dpicl datasets list" in http.get("/admin/datasets/nope").json()["error"]["message"]

    narrow = run(srv.url, "datasets", "list", columns=70)
    assert v1["id"] in narrow.stdout and v2["id"] in narrow.stdout, narrow.stdout  # ids are never cut

    missing = run(srv.url, "datasets", "delete", "nope", input="y\n")
    assert "no dataset" in one_error_line(missing) and "delete dataset" not in missing.stdout  # not asked
    kept = run(srv.url, "datasets", "delete", "qs", input="n\n")
    assert kept.exit_code == 1 and "qs v2" in kept.stdout
    assert len(ok_json(srv.url, "datasets", "list")["data"]) == 2
    gone = run(srv.url, "datasets", "delete", "qs", input="y\n")
    assert gone.exit_code == 0 and v2["id"] in gone.stdout
    assert [d["id"] for d in ok_json(srv.url, "datasets", "list")["data"]] == [v1["id"]]

    shown = run(srv.url, "budget", "set", "qs", "--epsilon", "6.123456789")
    assert "budget epsilon 6.123," in shown.stdout and "6.123456789" not in shown.stdout  # rounded

    declined = run(srv.url, "budget", "reset", "qs", "--reason", "new quarter", input="n\n")
    assert declined.exit_code == 1 and "reset the budget of qs" in declined.stdout
    assert "404" in one_error_line(run(srv.url, "budget", "reset", "nope", "--reason", "x", input="y\n"))
    assert ok_json(srv.url, "audit", "--action", "budget.reset")["data"] == []
    assert run(srv.url, "budget", "reset", "qs", "--reason", "new quarter", "--yes").exit_code == 0

    budget_records = ok_json(srv.url, "audit", "--action", "budget")["data"]
    assert [r["action"] for r in budget_records] == ["budget.reset", "budget.set"]  # newest first
    assert budget_records[0]["details"]["reason"] == "new quarter"
    assert {r["action"] for r in ok_json(srv.url, "audit", "--target", "qs")["data"]} >= {
        "dataset.upload", "dataset.delete", "budget.set", "budget.reset"}
    assert len(ok_json(srv.url, "audit", "--target", "qs", "-n", "2")["data"]) == 2
    assert ok_json(srv.url, "audit", "--actor", "someone-else")["data"] == []
    text = run(srv.url, "audit", "--action", "dataset.upload")
    assert text.exit_code == 0 and text.stdout.count("dataset.upload") == 2
    assert "--since" in one_error_line(run(srv.url, "audit", "--since", "soon"))


def test_jobs_list_names_the_dataset(monkeypatch):
    """``dpicl jobs list`` shows each job's dataset by name and version (an id only once deleted)."""
    import proxy.cli.jobs as jobs_cli

    answers = {
        "/admin/jobs": {"data": [
            {"id": "job_1", "kind": "pe", "state": "running", "progress": 50.0, "epsilon_charged": 1.0,
             "dataset_id": "ds_aaaaaaaaaaaaaaaa", "step": "iteration 2"},
            {"id": "job_2", "kind": "dpsgd", "state": "succeeded", "progress": 100.0, "epsilon_charged": 2.0,
             "dataset_id": "ds_bbbbbbbbbbbbbbbb"}]},
        "/admin/datasets": {"data": [{"id": "ds_aaaaaaaaaaaaaaaa", "name": "trec", "version": 2}]},
    }

    class FakeClient:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def get(self, path, **kwargs):
            return answers[path]

    monkeypatch.setattr(jobs_cli, "AdminClient", FakeClient)
    result = CliRunner().invoke(cli, ["jobs", "list"])
    assert result.exit_code == 0, result.stderr
    first, second = result.stdout.splitlines()
    assert "trec v2" in first and "ds_aaaa" not in first
    assert "ds_bbbbbbbbbbbbbbbb (deleted)" in second
