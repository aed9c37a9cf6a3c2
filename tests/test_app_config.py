"""Configuration loading and validation, and ``dpicl serve`` with no config at all."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from proxy.config import ConfigError, config_from_dict, load_config, sha256_hex
from proxy.task_config import LOCAL_MODEL_NAME
from tests.test_app_support import free_port, tiny_model_dir  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, data) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def test_defaults_without_file():
    cfg = load_config(None, {})
    assert cfg.tasks == [] and cfg.model_list == [] and cfg.client_keys == []
    assert cfg.store.url is None and cfg.admin_key is None
    assert cfg.server.max_body_bytes == 10 * 1024 * 1024
    assert cfg.serving_models() == {LOCAL_MODEL_NAME}


def test_env_overrides(tmp_path):
    cfg = load_config(None, {"DPICL_ADMIN_KEY": "adm-xyz-123", "DPICL_STORE_URL": "redis://x:1/0", "DPICL_LOCAL_MODEL": "/m"})
    assert cfg.admin_key == "adm-xyz-123" and cfg.store.url == "redis://x:1/0" and cfg.server.local_model == "/m"
    assert "adm-xyz-123" not in repr(cfg) and "adm-xyz-123" not in cfg.model_dump_json()  # the admin key is never shown
    path = _write(tmp_path, {"server": {"timeout": 3}})
    assert load_config(None, {"DPICL_CONFIG": str(path)}).server.timeout == 3


def test_job_settings_from_file_and_environment(tmp_path):
    path = _write(tmp_path, {"jobs": {"workers": 2, "queue_name": "q-file", "heartbeat_seconds": 1}})
    cfg = load_config(path, {"DPICL_JOB_QUEUE_NAME": "q-env", "DPICL_JOB_QUEUE": "redis://h:1/0"})
    assert (cfg.jobs.workers, cfg.jobs.queue_name, cfg.jobs.queue_url) == (2, "q-env", "redis://h:1/0")
    assert cfg.jobs.heartbeat_seconds == 1
    assert load_config(None, {}).jobs.queue_url is None  # in-process by default
    with pytest.raises(ConfigError, match="jobs.workers"):
        load_config(path, {"DPICL_JOB_WORKERS": "many"})


def test_example_config_loads():
    env = {"OPENAI_API_KEY": "sk-x", "APP1_KEY": "client-one"}
    cfg = load_config(ROOT / "examples" / "config.yaml", env)
    assert cfg.tasks and all(t.name for t in cfg.tasks)
    assert sha256_hex("client-one") in cfg.client_key_hashes


@pytest.mark.parametrize("data, fragment", [
    ("tasks: [unclosed", "invalid YAML"),
    ("- a\n- b\n", "top level must be a mapping"),
    ({"nonsense": 1}, "nonsense"),
    ({"server": {"timeout": -1}}, "server.timeout"),
    ({"model_list": [{"model_name": "m", "litellm_params": {"model": "openai/x", "api_key": "sk-literal"}}]},
     "os.environ/NAME"),
    ({"model_list": [{"model_name": "m", "litellm_params": {}}]}, "litellm_params.model"),
    ({"tasks": [{"name": "t", "dataset": "d", "instruction": "i", "upstream": "nope"}]}, "upstream 'nope'"),
    ({"tasks": [{"name": "t", "dataset": "d", "instruction": "i", "generator": "nope"}]}, "generator 'nope'"),
    ({"tasks": [{"name": "t", "dataset": "d", "instruction": "i", "epsilon": 0}]}, "epsilon"),
    ({"tasks": [{"name": "t", "dataset": "d", "instruction": "i", "on_missing": "maybe"}]}, "on_missing"),
    ({"tasks": [{"name": "t", "dataset": "d", "instruction": "i", "generation": {"mode": "x"}}]}, "generation.mode"),
    ({"tasks": [{"name": "t", "dataset": "d", "instruction": "i"}] * 2}, "unique"),
    ({"tasks": [{"name": LOCAL_MODEL_NAME, "dataset": "d", "instruction": "i"}]}, "unique"),
    ({"tasks": [{"name": "t", "dataset": "d", "instruction": "i", "answer": "word"}]}, "answer"),
    ({"model_list": [{"model_name": "m", "litellm_params": {"model": "openai/x"}}],
      "tasks": [{"name": "t", "dataset": "d", "instruction": "i", "upstream": "m", "answer": "label"}]},
     "answer 'label' needs a local upstream"),
    ({"client_keys": [{"name": "c", "key_env": "MISSING_KEY_VAR"}]}, "MISSING_KEY_VAR"),
    ({"client_keys": [{"name": "c"}]}, "exactly one of key_env or key_hash"),
    ({"client_keys": [{"name": "c", "key_hash": "abc"}]}, "SHA-256"),
])
def test_invalid_configs_have_clear_errors(tmp_path, data, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, data), {})
    assert fragment in str(info.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/dpicl.yaml", {})


def test_client_key_by_hash():
    cfg = config_from_dict({"client_keys": [{"name": "c", "key_hash": sha256_hex("s3cret"), "tasks": ["*"]}]}, {})
    assert cfg.client_key_hashes[sha256_hex("s3cret")].name == "c"


def test_serve_without_config_uses_sqlite_and_local_model(tmp_path, tiny_model_dir):
    """``dpicl serve`` with no config: SQLite in the data dir, the local model as ``local/smollm2``."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DPICL_")}
    env.update(DPICL_DATA_DIR=str(tmp_path / "data"), DPICL_LOCAL_MODEL=tiny_model_dir,
               DPICL_CACHE_DIR=os.environ.get("DPICL_CACHE_DIR", "/tmp/dpicl-cache"),
               LITELLM_LOCAL_MODEL_COST_MAP="True")
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/health/readiness", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        models = httpx.get(url + "/v1/models").json()
        assert [m["id"] for m in models["data"]] == [LOCAL_MODEL_NAME]
        r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": LOCAL_MODEL_NAME, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["role"] == "assistant"
        assert (tmp_path / "data" / "dpicl.db").exists()
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_new_tasks_default_to_the_public_prior_and_sigma_keeps_meaning_gaussian():
    """The default mechanism is public_prior (docs/evaluation.md); a task that sets only ``sigma``
    (the Gaussian noise multiplier) stays Gaussian, and sigma with public_prior is refused."""
    from pydantic import ValidationError

    from proxy.task_config import GenerationSettings

    default = GenerationSettings()
    assert (default.mechanism, default.mode, default.clip, default.temperature) == ("public_prior", "fixed", None, 1.0)
    assert GenerationSettings(sigma=1.5).mechanism == "gaussian"
    assert GenerationSettings(sigma=1.5, mechanism="exponential").mechanism == "exponential"
    with pytest.raises(ValidationError, match="not sigma"):
        GenerationSettings(sigma=1.5, mechanism="public_prior")
