"""Helpers shared by the app tests (no tests here): a live uvicorn server in a thread, configs,
a tiny generator model on disk, and datasets carrying a canary string."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("DPICL_CACHE_DIR", "/tmp/dpicl-cache")

import pytest

ADMIN_KEY = "admin-secret-key"
CLIENT_KEY = "client-secret-key"
CANARY = "ZQXCANARY7731"
FAKE_MODEL = "fake-model"
LABELS = ["LOC", "NUM", "HUM"]

#: Cheap generation so a warm-up takes well under a second with the tiny model.
TINY_GENERATION = {"mode": "fixed", "num_subsets": 2, "shots_per_subset": 1, "max_tokens": 3, "top_k": 8}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dataset_rows(n_per_label: int = 100, canary: bool = True) -> list[dict[str, str]]:
    """Labelled rows; every text carries the canary so any leak of any row is detectable."""
    words = {"LOC": "Where is the city of", "NUM": "How many people live in", "HUM": "Who founded the town of"}
    rows = []
    for i in range(n_per_label):
        for lab in LABELS:
            extra = f" {CANARY}{i}" if canary else ""
            rows.append({"text": f"{words[lab]} place{i}{extra}?", "label": lab})
    return rows


def jsonl_bytes(rows: list[dict[str, str]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def csv_bytes(rows: list[dict[str, str]]) -> bytes:
    import csv

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["text", "label"])
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


def task_spec(name: str, dataset: str, **over: Any) -> dict[str, Any]:
    spec = {
        "name": name, "upstream": FAKE_MODEL, "dataset": dataset,
        "instruction": "Classify the question by the type of its answer.",
        "input_prefix": "Question:", "label_prefix": "Answer type:",
        "label_words": {"LOC": "location", "NUM": "number", "HUM": "person"},
        "shots": 1, "generation": dict(TINY_GENERATION), "epsilon": 1.0,
    }
    spec.update(over)
    return spec


def make_config(store_url: str, fake_base_url: str, local_model: str | None, *, tasks: list[dict] | None = None,
                admin: bool = True, client_tasks: list[str] | None = None, open_mode: bool = False,
                max_body: int | None = None, extra_server: dict | None = None, extra_env: dict | None = None):
    from proxy.config import config_from_dict

    server: dict[str, Any] = {"timeout": 5.0, "retries": 1, "open": open_mode, "cache_recheck_seconds": 0.5}
    if local_model:
        server["local_model"] = local_model
    if max_body:
        server["max_body_bytes"] = max_body
    server.update(extra_server or {})
    data: dict[str, Any] = {
        "model_list": [{"model_name": FAKE_MODEL,
                        "litellm_params": {"model": f"openai/{FAKE_MODEL}", "api_base": fake_base_url}}],
        "tasks": tasks or [],
        "store": {"url": store_url},
        "server": server,
    }
    env: dict[str, str] = {}
    if admin:
        env["DPICL_ADMIN_KEY"] = ADMIN_KEY
    if client_tasks is not None:
        data["client_keys"] = [{"name": "app1", "key_env": "APP1_KEY", "tasks": client_tasks}]
        env["APP1_KEY"] = CLIENT_KEY
    env.update(extra_env or {})
    return config_from_dict(data, env)


class LiveServer:
    """A real uvicorn server for ``app`` on a free loopback port, in a background thread."""

    def __init__(self, app: Any, http: Any = None):
        import uvicorn

        from proxy.httpguard import http_protocol

        self.app = app
        self.port = free_port()
        # The HTTP protocol `dpicl serve` runs (with the request-head deadline of the app's config).
        config = getattr(getattr(app, "state", None), "config", None)
        if http is None:
            http = http_protocol(config.server.header_timeout) if config is not None else "auto"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False, lifespan="on", http=http))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class LogCapture(logging.Handler):
    """Collects every formatted line of the ``dpicl`` loggers (JSON formatter)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        from proxy.logs import JsonFormatter

        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        # Also keep raw messages and args: a formatter could hide something the record carries.
        self.lines.append(str(record.getMessage()))


@contextmanager
def capture_logs() -> Iterator[LogCapture]:
    handler = LogCapture()
    loggers = [logging.getLogger(n) for n in ("dpicl", "uvicorn", "uvicorn.error", "uvicorn.access", "")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield handler
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama with the SmolLM2 tokenizer saved as a model directory."""
    from tests.tiny_model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def fake_upstream() -> Iterator[Any]:
    from proxy.devtools.fake_upstream import FakeUpstream

    with FakeUpstream() as fake:
        yield fake


def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


def declared_labels(data: bytes, filename: str = "rows.jsonl") -> list[str] | None:
    """The labels of ``data`` (what a test that knows its rows declares), None if unparsable."""
    from aggregation.datasets import DataError, parse_rows

    try:
        return sorted({e.label for e in parse_rows(data, filename)})
    except (DataError, UnicodeDecodeError):
        return None


def upload(client: Any, name: str, data: bytes, filename: str = "rows.jsonl", **fields: Any) -> Any:
    """Upload through the admin API. Non-public uploads declare the label domain: ``labels`` (a
    list) if given, else the rows' own labels (the test knows its data); ``labels=None`` sends none."""
    if "labels" not in fields and str(fields.get("public", "false")).lower() not in ("1", "true", "yes", "on"):
        fields["labels"] = declared_labels(data, filename)
    if isinstance(fields.get("labels"), (list, tuple)):
        fields["labels"] = json.dumps(list(fields["labels"]))
    if fields.get("labels") is None:
        fields.pop("labels", None)
    form = {"name": name, **{k: str(v) for k, v in fields.items()}}
    return client.post("/admin/datasets", headers=admin_headers(), data=form,
                       files={"file": (filename, data, "application/octet-stream")})


def assert_openai_error(resp: Any, status: int) -> dict[str, Any]:
    """The response has ``status`` and an OpenAI-style error body; returns the error object."""
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert {"message", "type", "param", "code"} <= set(err), err
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"]
    return err


#: Generation settings added after cache keys were first written; at their defaults they must stay
#: out of the key, so that tasks written before them keep their cached sets.
LATER_GENERATION_SETTINGS = ("clusters", "clustering", "guidance", "private_tokens")


def legacy_cache_key(task: Any, meta: Any, generator: str) -> str:
    """The cache key of ``task`` computed as it was before any of LATER_GENERATION_SETTINGS existed."""
    import hashlib

    from proxy.serving.demos import PAYLOAD_VERSION

    gen = task.generation.model_dump(mode="json")
    for key in LATER_GENERATION_SETTINGS:
        gen.pop(key)
    return hashlib.sha256(json.dumps({
        "dataset_id": meta.id, "dataset_version": meta.version, "template": task.template_hash(),
        "generation": gen, "epsilon": repr(float(task.epsilon)), "shots": task.shots, "labels": meta.labels,
        "generator": generator, "seed": task.revision, "v": PAYLOAD_VERSION,
    }, sort_keys=True).encode()).hexdigest()
