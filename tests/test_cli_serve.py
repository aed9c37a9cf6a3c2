"""Small defaults of ``dpicl serve``: one-line config errors, help without raw markup, JSON-only
logs, and the local model's sampling and BOS defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from proxy.cli import app as cli
from proxy.cli.serve import is_loopback
from proxy.upstreams.local import DEFAULT_TEMPERATURE, _with_bos, parse_params

ROOT = Path(__file__).resolve().parents[1]


def _serve(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    drop = ("OPENAI_API_KEY", "APP1_KEY", "DPICL_CONFIG", "DPICL_ADMIN_KEY")
    full = {k: v for k, v in os.environ.items() if k not in drop}
    full.update(env, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "proxy.cli", "serve", *args], env=full, capture_output=True,
                          text=True, timeout=120, cwd=str(ROOT))


def test_missing_provider_key_is_one_line_naming_the_variable(tmp_path):
    proc = _serve("--config", "examples/config-openai.yaml", "--port", "1",
                  env={"DPICL_ADMIN_KEY": "a", "APP1_KEY": "b", "DPICL_DATA_DIR": str(tmp_path)})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "OPENAI_API_KEY" in lines[0] and "gpt-4o-mini" in lines[0] and "export" in lines[0]
    assert "Traceback" not in proc.stderr


def test_missing_client_key_variable_is_one_line(tmp_path):
    proc = _serve("--config", "examples/config.yaml", "--port", "1",
                  env={"DPICL_ADMIN_KEY": "a", "DPICL_DATA_DIR": str(tmp_path)})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "APP1_KEY" in lines[0], proc.stderr


def test_bad_store_url_is_one_line(tmp_path):
    proc = _serve("--port", "1", env={"DPICL_ADMIN_KEY": "a", "DPICL_STORE_URL": "postgres://u:hunter2@h/db",
                                      "DPICL_DATA_DIR": str(tmp_path)})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "store.url" in lines[0], proc.stderr
    assert "hunter2" not in proc.stderr and "Traceback" not in proc.stderr


def test_no_admin_key_means_loopback_only(tmp_path):
    """The image used to start open (no key needed on /v1) on 0.0.0.0 when DPICL_ADMIN_KEY was unset."""
    for host in ("0.0.0.0", "::", "example.org"):
        proc = _serve("--host", host, "--port", "1", env={"DPICL_DATA_DIR": str(tmp_path)})
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "DPICL_ADMIN_KEY" in lines[0], proc.stderr
    assert all(map(is_loopback, ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost")))
    assert not any(map(is_loopback, ("0.0.0.0", "::", "10.0.0.1", "example.org", "")))


def test_serve_help_has_no_raw_markup():
    result = CliRunner().invoke(cli, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "``" not in result.stdout and "[bold" not in result.stdout and "local/smollm2" in result.stdout


def test_server_logging_turns_warnings_and_library_logs_into_json_lines():
    code = ("import logging, warnings\n"
            "from proxy.logs import server_logging\n"
            "config = server_logging()\n"
            "import logging.config; logging.config.dictConfig(config)\n"
            "warnings.warn('a library changes its defaults', FutureWarning)\n"
            "logging.getLogger('transformers.modeling_utils').warning('some library message')\n"
            "logging.getLogger('uvicorn.error').info('Started server process')\n"
            "import os; print(os.environ['TQDM_DISABLE'], os.environ['HF_HUB_DISABLE_PROGRESS_BARS'])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=str(ROOT),
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "1"]  # progress bars off
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    records = [json.loads(ln) for ln in lines]  # every line is JSON
    assert any("FutureWarning" in r.get("msg", "") for r in records)
    assert any(r.get("msg") == "some library message" for r in records)
    assert any(r.get("logger") == "uvicorn.error" for r in records)


def test_local_model_defaults_to_greedy():
    assert DEFAULT_TEMPERATURE == 0.0
    assert parse_params({}, 512).temperature == 0.0
    assert parse_params({"temperature": 0.7}, 512).temperature == 0.7


class _Tok:
    """A tokenizer that puts BOS (id 1) in front of text by default, like Llama's."""

    bos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [ord(c) for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


class _NoBosTok(_Tok):
    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [ord(c) for c in text]}


def test_bos_added_once_when_the_tokenizer_adds_one():
    assert _with_bos(_Tok(), [104, 105]) == [1, 104, 105]
    assert _with_bos(_Tok(), [1, 104]) == [1, 104]  # a template that already starts with BOS
    assert _with_bos(_NoBosTok(), [104, 105]) == [104, 105]  # SmolLM2's tokenizer adds none


_SHOW_HTTP = """
import sys, uvicorn
from proxy.cli import app
seen = {}
uvicorn.run = lambda *args, **kw: seen.update(kw)
try:
    app(["serve", "--config", sys.argv[1], "--port", "1"] + sys.argv[2:])
except SystemExit:
    pass
print(seen["http"].func.__name__, seen["http"].keywords["header_timeout"])
"""


def test_serve_runs_uvicorn_with_the_header_deadline(tmp_path):
    """`dpicl serve` (one worker or several) hands uvicorn the protocol that closes slow-header clients."""
    (tmp_path / "c.yaml").write_text("server: {header_timeout: 3.5}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("DPICL_CONFIG", "PROMETHEUS_MULTIPROC_DIR")}
    env.update(PYTHONPATH=str(ROOT), DPICL_DATA_DIR=str(tmp_path))
    for workers in ("1", "2"):
        proc = subprocess.run([sys.executable, "-c", _SHOW_HTTP, str(tmp_path / "c.yaml"), "--workers", workers],
                              env=env, capture_output=True, text=True, timeout=120, cwd=str(ROOT))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split() == ["GuardedHttpToolsProtocol", "3.5"], proc.stdout


def test_missing_scrape_token_variable_is_one_line(tmp_path):
    (tmp_path / "c.yaml").write_text("server: {metrics_token_env: DPICL_SCRAPE_TOKEN}\n")
    proc = _serve("--config", str(tmp_path / "c.yaml"), "--port", "1",
                  env={"DPICL_ADMIN_KEY": "a", "DPICL_DATA_DIR": str(tmp_path)})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "DPICL_SCRAPE_TOKEN" in lines[0], proc.stderr
