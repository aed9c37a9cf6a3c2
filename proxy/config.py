"""Service configuration: one YAML file (``DPICL_CONFIG`` or ``dpicl serve --config``) plus env vars.

Secrets never live in the file: upstream keys are written ``os.environ/NAME`` (LiteLLM style) and
client keys name the environment variable that holds them (``key_env``) or give the key's SHA-256
(``key_hash``). The admin key comes from ``DPICL_ADMIN_KEY`` only.

With no file at all the service has no tasks, no upstreams except the built-in local model
(exposed as ``local/smollm2``) and an SQLite store in the data directory. See docs/serving.md.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from proxy.task_config import LOCAL_ALIASES, LOCAL_MODEL_NAME, ModelName, Strict, TaskConfig


class ConfigError(ValueError):
    """The configuration file or environment is invalid (message says where and why)."""


class ModelEntry(BaseModel):
    """One LiteLLM-style ``model_list`` item: ``model_name`` is what clients send."""

    model_config = ConfigDict(extra="allow")

    model_name: ModelName
    litellm_params: dict[str, Any]

    @field_validator("litellm_params")
    @classmethod
    def _params(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(v.get("model"), str) or not v["model"]:
            raise ValueError("litellm_params.model is required")
        key = v.get("api_key")
        if isinstance(key, str) and key and not key.startswith("os.environ/"):
            # A literal key in a config file ends up in backups and repos: refuse it.
            raise ValueError("api_key must be written 'os.environ/NAME' (secrets come from the environment)")
        return v


#: Bounds of a dataset name's privacy budget (epsilon), the same on every way in (config default,
#: upload form, ``PUT`` budget routes). An epsilon of 100 gives no meaningful protection and larger
#: values are typos (or 1e308); below 0.001 no mechanism the service runs could be paid for, and
#: subnormal values such as 5e-324 break the accountant's comparisons.
MIN_BUDGET_EPSILON = 1e-3
MAX_BUDGET_EPSILON = 100.0


class StoreSettings(Strict):
    #: ``sqlite:///path`` or ``redis://host:port/db``; None = SQLite file in the data directory.
    url: str | None = None


class ServerSettings(Strict):
    #: Seconds per upstream attempt.
    timeout: float = Field(60.0, gt=0)
    #: Extra attempts on transient upstream errors (with backoff).
    retries: int = Field(2, ge=0, le=10)
    #: Longest total wait between the retries of one request (backoff and upstream ``Retry-After``);
    #: a longer ``Retry-After`` is passed to the client with the 429 instead of being waited out.
    max_retry_wait: float = Field(8.0, ge=0, le=300)
    #: Seconds from the start of a request by which its whole body must have arrived; a slower
    #: body is cut off with 408 (and the connection closed).
    body_timeout: float = Field(60.0, gt=0, le=3600)
    #: Seconds a connection may take to send a request's headers (from its opening, or from the
    #: end of the previous answer on a kept-alive connection); a slower one is closed
    #: (:mod:`proxy.httpguard`): uvicorn has no such bound of its own.
    header_timeout: float = Field(10.0, gt=0, le=600)
    #: Environment variable holding a bearer token for ``GET /metrics`` (a Prometheus scrape
    #: token); the admin key works too. Unset: only the admin key reads /metrics.
    metrics_token_env: str | None = Field(None, min_length=1)
    #: Largest accepted request body (checked on Content-Length and on the streamed body).
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    #: Serve /v1 without a client key even when an admin key is set (local development).
    open: bool = False
    #: On SIGTERM, seconds to let running requests finish before they are cancelled (an upload in
    #: progress is then abandoned: its staged rows are discarded, nothing committed is lost).
    shutdown_grace_seconds: float = Field(5.0, gt=0, le=600)
    #: How often a replica re-reads the store for demonstrations / admin tasks it has in memory.
    cache_recheck_seconds: float = Field(5.0, ge=0)
    #: Budget of a newly uploaded dataset unless the upload names one.
    default_budget_epsilon: float = Field(4.0, ge=MIN_BUDGET_EPSILON, le=MAX_BUDGET_EPSILON)
    default_budget_delta: float = Field(1e-5, gt=0, lt=1)
    #: One JSON line per request on stderr (written by a background thread).
    access_log: bool = True
    #: Directory of a local Hugging Face model to use instead of SmolLM2 (``DPICL_LOCAL_MODEL``).
    local_model: str | None = None
    #: Numeric precision of the local model when it generates demonstrations (``DPICL_LOCAL_PRECISION``):
    #: ``float32``, ``bfloat16`` or ``int8`` (run one row per forward; docs/sources.md). Serving
    #: answers with the local upstream stay in float32.
    local_precision: Literal["float32", "bfloat16", "int8"] = "float32"


#: RQ queue of offline jobs, unless ``jobs.queue_name`` says otherwise.
DEFAULT_JOB_QUEUE = "dpicl-jobs"


class JobSettings(Strict):
    """Offline jobs (PE, DP-SGD). Each field also has a ``DPICL_JOB_*`` variable, which wins."""

    #: Redis URL of the job queue; unset = a thread pool in the server (``DPICL_JOB_QUEUE``).
    queue_url: str | None = None
    #: RQ queue name (``DPICL_JOB_QUEUE_NAME``); workers must use the same one.
    queue_name: str = Field(DEFAULT_JOB_QUEUE, min_length=1)
    #: In-process jobs run at once (``DPICL_JOB_WORKERS``); one uses the cores best.
    workers: int = Field(1, ge=1, le=64)
    #: Seconds between heartbeats of in-process jobs (``DPICL_JOB_HEARTBEAT``).
    heartbeat_seconds: float = Field(5.0, gt=0)
    #: A job silent this long is marked failed; at least 6 heartbeats (``DPICL_JOB_STALE_AFTER``).
    stale_after_seconds: float | None = Field(None, gt=0)


_JOB_ENV = {"DPICL_JOB_QUEUE": "queue_url", "DPICL_JOB_QUEUE_NAME": "queue_name", "DPICL_JOB_WORKERS": "workers",
            "DPICL_JOB_HEARTBEAT": "heartbeat_seconds", "DPICL_JOB_STALE_AFTER": "stale_after_seconds"}


class ClientKey(Strict):
    """A per-client API key and the tasks it may use (``"*"`` = every task)."""

    name: str
    key_env: str | None = None
    key_hash: str | None = None
    tasks: list[str] = Field(default_factory=list)
    #: May this client also call pass-through (non-task) models?
    passthrough: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> "ClientKey":
        if (self.key_env is None) == (self.key_hash is None):
            raise ValueError(f"client key {self.name!r}: give exactly one of key_env or key_hash")
        if self.key_hash is not None and not re.fullmatch(r"[0-9a-f]{64}", self.key_hash):
            raise ValueError(f"client key {self.name!r}: key_hash must be a lowercase SHA-256 hex digest")
        return self


class Config(Strict):
    model_list: list[ModelEntry] = Field(default_factory=list)
    tasks: list[TaskConfig] = Field(default_factory=list)
    store: StoreSettings = Field(default_factory=StoreSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    client_keys: list[ClientKey] = Field(default_factory=list)
    #: From ``DPICL_ADMIN_KEY``; never read from the file.
    admin_key: str | None = Field(None, exclude=True, repr=False)
    #: From the variable ``server.metrics_token_env`` names; never read from the file.
    metrics_token: str | None = Field(None, exclude=True, repr=False)
    #: SHA-256 of each client key -> client, resolved from the environment at load time.
    client_key_hashes: dict[str, ClientKey] = Field(default_factory=dict, exclude=True, repr=False)

    @model_validator(mode="after")
    def _unique(self) -> "Config":
        names = [m.model_name for m in self.model_list]
        if LOCAL_MODEL_NAME in names:
            raise ValueError(f"{LOCAL_MODEL_NAME!r} is the built-in local model; pick another model_name")
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate model_name: {sorted(dup)}")
        tnames = [t.name for t in self.tasks]
        dup = {n for n in tnames if tnames.count(n) > 1} | (set(tnames) & (set(names) | {LOCAL_MODEL_NAME}))
        if dup:
            raise ValueError(f"task names must be unique and differ from model names: {sorted(dup)}")
        for t in self.tasks:
            self.check_task_models(t)
        return self

    def serving_models(self) -> set[str]:
        """Model names a task may use as upstream (model_list + the local model)."""
        return {m.model_name for m in self.model_list} | {LOCAL_MODEL_NAME}

    def check_task_models(self, task: TaskConfig) -> None:
        """Raise ValueError when a task names an unknown upstream or generator model."""
        models = self.serving_models()
        if task.upstream not in models and task.upstream not in LOCAL_ALIASES:
            raise ValueError(f"task {task.name!r}: upstream {task.upstream!r} is not in model_list")
        if task.answer == "label" and not self.is_local_model(task.upstream):
            raise ValueError(f"task {task.name!r}: answer 'label' needs a local upstream (e.g. {LOCAL_MODEL_NAME}), "
                             f"not {task.upstream!r}")
        if task.generator is not None and task.generator not in LOCAL_ALIASES and task.generator not in models:
            raise ValueError(f"task {task.name!r}: generator {task.generator!r} is not in model_list")

    def is_local_model(self, name: str) -> bool:
        """Whether ``name`` is served by a local model (the built-in one or a ``local/...`` entry)."""
        entry = self.model_entry(name)
        return name in LOCAL_ALIASES if entry is None else entry.litellm_params["model"].split("/")[0] == "local"

    def model_entry(self, name: str) -> ModelEntry | None:
        for m in self.model_list:
            if m.model_name == name:
                return m
        return None


def sha256_hex(secret: str) -> str:
    """Hex SHA-256 of a key (how client keys are compared and configured)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load the YAML file at ``path`` (else ``DPICL_CONFIG``; none = defaults) and the environment.

    Raises :class:`ConfigError` with a readable message for any problem.
    """
    env = os.environ if env is None else env
    path = path or env.get("DPICL_CONFIG") or None
    data: dict[str, Any] = {}
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise ConfigError(f"{p}: invalid YAML{where}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        data = loaded
    return config_from_dict(data, env, source=str(path) if path else "defaults")


def config_from_dict(data: Mapping[str, Any], env: Mapping[str, str] | None = None, source: str = "config") -> Config:
    """Validate a config mapping and resolve its environment-backed parts."""
    env = os.environ if env is None else env
    data = dict(data)
    job_env = {field: env[name] for name, field in _JOB_ENV.items() if env.get(name)}
    if job_env:  # validated with the file's values, so a bad variable is named like a bad key
        data["jobs"] = {**(data.get("jobs") or {}), **job_env}
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: " + format_validation_errors(exc.errors())) from None
    cfg.admin_key = env.get("DPICL_ADMIN_KEY") or None
    token_env = cfg.server.metrics_token_env
    if token_env is not None:
        cfg.metrics_token = env.get(token_env) or None
        if cfg.metrics_token is None:
            raise ConfigError(f"{source}: server.metrics_token_env: environment variable {token_env} is not set "
                              f"(export {token_env}=<the scrape token>)")
    if env.get("DPICL_STORE_URL"):
        cfg.store.url = env["DPICL_STORE_URL"]
    if env.get("DPICL_LOCAL_MODEL") and not cfg.server.local_model:
        cfg.server.local_model = env["DPICL_LOCAL_MODEL"]
    if env.get("DPICL_LOCAL_PRECISION"):
        precision = env["DPICL_LOCAL_PRECISION"]
        if precision not in ("float32", "bfloat16", "int8"):
            raise ConfigError(f"{source}: DPICL_LOCAL_PRECISION must be float32, bfloat16 or int8, not {precision!r}")
        cfg.server.local_precision = precision  # type: ignore[assignment]
    hashes: dict[str, ClientKey] = {}
    for ck in cfg.client_keys:
        if ck.key_env is not None:
            secret = env.get(ck.key_env)
            if not secret:
                raise ConfigError(f"{source}: client key {ck.name!r}: environment variable {ck.key_env} is not set "
                                  f"(export {ck.key_env}=<the key>)")
            digest = sha256_hex(secret)
        else:
            digest = ck.key_hash  # type: ignore[assignment]
        if digest in hashes:
            raise ConfigError(f"{source}: client keys {hashes[digest].name!r} and {ck.name!r} are the same key")
        hashes[digest] = ck
    cfg.client_key_hashes = hashes
    _check_model_env(cfg, env, source)
    return cfg


def _check_model_env(cfg: Config, env: Mapping[str, str], source: str) -> None:
    """Every ``os.environ/NAME`` of ``model_list`` must be set now, not at the first request."""
    for entry in cfg.model_list:
        for key, value in entry.litellm_params.items():
            if isinstance(value, str) and value.startswith("os.environ/"):
                var = value[len("os.environ/"):]
                if not env.get(var):
                    raise ConfigError(
                        f"{source}: model_list {entry.model_name!r} litellm_params.{key}: environment variable "
                        f"{var} is not set (export {var}=..., or remove that model from model_list)")


def format_validation_errors(errors: list[dict[str, Any]]) -> str:
    """'field.path: message; ...' from pydantic errors, never quoting the offending input."""
    parts = []
    for err in errors[:10]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "(root)"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = f" (+{len(errors) - 10} more)" if len(errors) > 10 else ""
    return "; ".join(parts) + more
