"""The README's serving walkthrough and jobs section, run verbatim against a live server (slow; CI
runs it).

The blocks marked ``<!-- walkthrough: server|shell|python|jobs -->`` in README.md are extracted and
run as written: the server block starts ``dpicl serve`` in the background, the shell block is the
admin's session (sample data, upload, task, warm-up, budget), the python block is the app with
the official ``openai`` client (plain and streaming), the jobs block runs both synthetic-data jobs
on the same dataset and evaluates one. Only the port is changed (a free one instead of 8000).
``dpicl`` is this checkout's CLI; the environment starts without any DPICL_* or key variables, so
the blocks must set everything they need. The blocks run in a stand-in for the repository root
(with ``examples/``) and a fresh ``HOME``; the root must hold nothing new afterwards.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.test_app_support import free_port

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- walkthrough: (server|shell|python|jobs) -->\s*```(?:bash|python)\n(.*?)```", re.S)
KINDS = ["server", "shell", "python", "jobs"]
#: The label words of the walkthrough's task (its answers are one of them).
WORDS = {"location", "number", "person"}


def walkthrough_blocks(readme: str) -> dict[str, str]:
    """The marked blocks of the README by kind (each kind exactly once, in this order)."""
    found = BLOCK.findall(readme)
    assert [kind for kind, _ in found] == KINDS, [k for k, _ in found]
    return dict(found)


def test_walkthrough_blocks_are_marked_and_use_one_port():
    blocks = walkthrough_blocks((ROOT / "README.md").read_text())
    assert "dpicl serve" in blocks["server"] and "--port 8000" in blocks["server"]
    for kind in ("shell", "python", "jobs"):
        assert "127.0.0.1:8000" in blocks[kind], kind
    assert "from openai import OpenAI" in blocks["python"] and "stream=True" in blocks["python"]
    assert "--answer label" in blocks["shell"]  # the client call shows the task doing its job
    # Files go to a directory of their own, not into the checkout; the jobs evaluate on held-out rows.
    assert "cd ~/" in blocks["shell"] and "cd ~/" in blocks["jobs"]
    assert "--test-output trec_test.jsonl" in blocks["shell"] and "--test trec_test.jsonl" in blocks["jobs"]


@pytest.mark.slow
@pytest.mark.ci
def test_readme_walkthrough_runs_verbatim(tmp_path):
    port = free_port()
    blocks = {kind: text.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace("--port 8000", f"--port {port}")
              for kind, text in walkthrough_blocks((ROOT / "README.md").read_text()).items()}
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "dpicl"  # this checkout's CLI, as `dpicl` on the PATH
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m proxy.cli "$@"\n')
    shim.chmod(0o755)
    repo, home = tmp_path / "repo", tmp_path / "home"  # a stand-in for the checkout's root; a fresh HOME
    repo.mkdir()
    home.mkdir()
    (repo / "examples").symlink_to(ROOT / "examples")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DPICL_") and k not in ("APP1_KEY", "OPENAI_API_KEY")}
    env.update(PATH=f"{bindir}:{env.get('PATH', '')}", PYTHONPATH=str(ROOT), DPICL_DATA_DIR=str(tmp_path / "data"),
               DPICL_CACHE_DIR=os.environ.get("DPICL_CACHE_DIR", "/tmp/dpicl-cache"), LITELLM_LOCAL_MODEL_COST_MAP="True",
               HOME=str(home))
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(["bash", "-c", blocks["server"]], cwd=repo, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/readiness", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.5)

        outputs = tmp_path / "outputs"  # what each block printed, for a person reading a failure
        outputs.mkdir()

        def run_block(kind: str, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
            done = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
            (outputs / f"{kind}.out").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            assert "Traceback" not in done.stderr
            return done

        admin = run_block("shell", ["bash", "-e", "-c", blocks["shell"]], 1800)
        work = home / "dpicl-walkthrough"
        pool = [json.loads(x)["text"] for x in (work / "trec.jsonl").read_text().splitlines()]
        test = [json.loads(x)["text"] for x in (work / "trec_test.jsonl").read_text().splitlines()]
        assert len(test) == 500 and not set(pool) & set(test)  # the uploaded pool holds no test question
        assert "trec-quick" in admin.stdout and "trec-classifier" in admin.stdout  # tasks list

        app = run_block("python", [sys.executable, "-c", blocks["python"]], 600)
        answers = app.stdout.split()
        assert len(answers) == 2 and set(answers) <= WORDS, app.stdout  # the task answers with its label words

        admin_key = re.search(r"DPICL_ADMIN_KEY=(\S+)", blocks["server"]).group(1)
        demos = httpx.get(f"http://127.0.0.1:{port}/admin/tasks/trec-quick/demos", timeout=30,
                          headers={"Authorization": f"Bearer {admin_key}"}).json()
        # One demonstration per label, except that DP output may come out empty (the label is then
        # listed in empty_labels and nothing is injected for it).
        payload = demos["demonstrations"]
        covered = [d["label"] for d in payload["demos"]] + payload["empty_labels"]
        assert demos["cached"] is True and sorted(covered) == ["HUM", "LOC", "NUM"] and payload["demos"], payload

        jobs = run_block("jobs", ["bash", "-e", "-c", blocks["jobs"]], 3600)
        report = json.loads(jobs.stdout[jobs.stdout.index("{"):jobs.stdout.rindex("}") + 1])
        assert report["test_rows"] == 500 and report["real_train_rows"] == len(pool), report
        assert report["synthetic_rows"] > 0 and 0 <= report["majority_accuracy"] <= 1, report
        assert (work / "synthetic.jsonl").stat().st_size > 0 and (work / "adapter.tar.gz").stat().st_size > 0
        assert sorted(p.name for p in repo.iterdir()) == ["examples"]  # nothing written into the checkout
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    lines = [ln for ln in (tmp_path / "server.log").read_text().splitlines() if ln.strip()]
    records = [json.loads(ln) for ln in lines]  # JSON lines only: no progress bars, no bare warnings
    chats = [r for r in records if r.get("path") == "/v1/chat/completions"]
    assert [(r["status"], r.get("task"), r.get("client")) for r in chats] == [(200, "trec-quick", "app1")] * 2
    assert not [r for r in records if r.get("status", 200) >= 500]
