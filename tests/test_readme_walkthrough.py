"""The README's serving walkthrough, run verbatim against a live server (slow; CI runs it).

The blocks marked ``<!-- walkthrough: server|shell|python -->`` in README.md are extracted and run
as written: the server block starts ``dpicl serve`` in the background, the shell block is the
admin's session (sample data, upload, task, warm-up, budget), the python block is the app with
the official ``openai`` client (plain and streaming). Only the port is changed (a free one instead
of 8000). ``dpicl`` is this checkout's CLI; the environment starts without any DPICL_* or key
variables, so the blocks must set everything they need.
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
BLOCK = re.compile(r"<!-- walkthrough: (server|shell|python) -->\s*```(?:bash|python)\n(.*?)```", re.S)


def walkthrough_blocks(readme: str) -> dict[str, str]:
    """The marked blocks of the README by kind (each kind exactly once, in this order)."""
    found = BLOCK.findall(readme)
    assert [kind for kind, _ in found] == ["server", "shell", "python"], [k for k, _ in found]
    return dict(found)


def test_walkthrough_blocks_are_marked_and_use_one_port():
    blocks = walkthrough_blocks((ROOT / "README.md").read_text())
    assert "dpicl serve" in blocks["server"] and "--port 8000" in blocks["server"]
    assert "127.0.0.1:8000" in blocks["shell"] and "127.0.0.1:8000" in blocks["python"]
    assert "from openai import OpenAI" in blocks["python"] and "stream=True" in blocks["python"]


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
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DPICL_") and k not in ("APP1_KEY", "OPENAI_API_KEY")}
    env.update(PATH=f"{bindir}:{env.get('PATH', '')}", PYTHONPATH=str(ROOT), DPICL_DATA_DIR=str(tmp_path / "data"),
               DPICL_CACHE_DIR=os.environ.get("DPICL_CACHE_DIR", "/tmp/dpicl-cache"), LITELLM_LOCAL_MODEL_COST_MAP="True")
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(["bash", "-c", blocks["server"]], cwd=tmp_path, env=env, stdout=log,
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

        admin = subprocess.run(["bash", "-e", "-c", blocks["shell"]], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=1800)
        assert admin.returncode == 0, admin.stdout[-3000:] + admin.stderr[-3000:]
        assert "Traceback" not in admin.stderr
        assert (tmp_path / "trec.jsonl").exists()
        assert "trec-quick" in admin.stdout and "trec-classifier" in admin.stdout  # tasks list

        app = subprocess.run([sys.executable, "-c", blocks["python"]], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
        assert app.returncode == 0, app.stderr[-3000:]
        assert app.stdout.strip()  # the answer and the streamed answer were printed

        admin_key = re.search(r"DPICL_ADMIN_KEY=(\S+)", blocks["server"]).group(1)
        demos = httpx.get(f"http://127.0.0.1:{port}/admin/tasks/trec-quick/demos", timeout=30,
                          headers={"Authorization": f"Bearer {admin_key}"}).json()
        assert demos["cached"] is True and len(demos["demonstrations"]["demos"]) == 3
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
