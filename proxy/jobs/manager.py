"""Offline jobs (Private Evolution, DP-SGD): submission, records, runners and the worker.

Life of a job
-------------
1. :meth:`JobManager.submit` validates the request, takes the dataset's DP label counts
   (``BudgetService.noisy_counts``: charged once on ``"*"``, then free), plans the job from public
   quantities only (``aggregation.pe.plan_pe`` / ``aggregation.dpsgd.plan_dpsgd``: calibrated
   sigma / noise multiplier, sampling rate), **reserves the full cost in the ledger** (refused with
   ``BudgetExceeded`` when it does not fit), writes the job record and only then enqueues it.
2. A runner executes :func:`execute_job`: in-process (a thread pool owned by the app's lifespan,
   the embedded default) or on a Redis queue built on RQ, served by ``dpicl worker`` processes on
   any number of machines sharing the queue and a store.
3. The worker loads the private rows (the spend is already recorded), runs the algorithm with the
   *recorded* plan (the noise the ledger was charged for, never re-calibrated), reports progress
   per iteration/step, checks the record's cancel flag between iterations/steps and stores the
   results as blobs (synthetic JSONL; the LoRA adapter as tar.gz).

A worker that dies mid-job never leaves it silently "running": workers refresh ``heartbeat_at``
in the record every few seconds and any reader marks a job whose heartbeat is older than
``stale_after`` as failed; RQ's own detection of a killed work horse marks it failed at once. The
reserved privacy cost always stays spent (the noise may have been partly released).

Records and errors hold no private text: labels, numbers, states and exception *type* names only
(an exception's message could quote a record).
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import tarfile
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field

from aggregation.pe import Cancelled, PEConfig, PEPlan, first_line, plan_pe, random_prompt, run_pe, \
    variation_prompt, random_messages, variation_messages
from aggregation.prompts import Example, TaskPrompt
from proxy.budget import _num
from proxy.config import DEFAULT_JOB_QUEUE, LOCAL_ALIASES, Config, JobSettings
from proxy.store.base import BudgetExceeded, NotFound, Store

log = logging.getLogger("dpicl.jobs")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINISHED_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED})
DEFAULT_QUEUE = DEFAULT_JOB_QUEUE
class JobError(Exception):
    """A job-level failure whose message is safe to show (never contains private text)."""


class JobRequestError(ValueError):
    """A submission is invalid (HTTP 400); the message names fields, never data."""


class JobConflict(Exception):
    """The job is not in a state that allows the operation (HTTP 409)."""


#: Exception types whose messages we write into job records (ours, known to hold no data).
_SAFE_ERRORS = (JobError, JobRequestError)


# ---------------------------------------------------------------------------------------------
# Requests (the HTTP boundary validates these).


class PromptSpec(BaseModel):
    """Prompt fields of the synthetic texts (same meaning as a task's fields)."""

    model_config = ConfigDict(extra="forbid")
    instruction: str = Field("Write one example text.", min_length=1, max_length=2000)
    input_prefix: str = Field("Text:", min_length=1, max_length=100)
    label_prefix: str = Field("Label:", min_length=1, max_length=100)
    label_words: dict[str, str] = Field(default_factory=dict)


class _JobBase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: str = Field(min_length=1, max_length=200, description="dataset id (or name: latest version)")
    epsilon: float | None = Field(4.0, gt=0, description="target epsilon of the whole job")
    seed: int | None = Field(None, description="reproducible noise and sampling (tests, benchmarks)")
    labels: list[str] | None = Field(None, description="labels to synthesise (default: all of the dataset)")
    task: str | None = Field(None, description="take prompt fields from this configured task")
    prompt: PromptSpec | None = None
    num_samples: int = Field(120, ge=1, le=100_000)
    model: str | None = Field(None, description="'local' (default), a model_list name (PE), or a local model directory")
    # No count_sigma here: the label counts a job uses are the dataset's shared release
    # (BudgetService.noisy_counts, drawn at COUNT_SIGMA), so the plan must assume that sigma.


class PEJobRequest(_JobBase):
    """``POST /admin/jobs`` body for Private Evolution."""

    kind: Literal["pe"]
    sigma: float | None = Field(None, gt=0)
    iterations: int = Field(4, ge=1, le=100)
    population: int = Field(32, ge=1, le=10_000)
    k: int = Field(1, ge=1, le=100)
    threshold: float | None = Field(None, ge=0)
    temperature: float = Field(1.0, gt=0, le=2)
    max_new_tokens: int = Field(40, ge=1, le=512)


class DPSGDJobRequest(_JobBase):
    """``POST /admin/jobs`` body for DP-SGD fine-tuning."""

    kind: Literal["dpsgd"]
    noise_multiplier: float | None = Field(None, gt=0)
    steps: int = Field(100, ge=1, le=100_000)
    batch_size: int = Field(16, ge=1, le=4096)
    learning_rate: float = Field(2e-3, gt=0, le=1)
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(48, ge=4, le=1024)
    lora_r: int = Field(8, ge=1, le=256)
    temperature: float = Field(1.0, gt=0, le=2)
    max_new_tokens: int = Field(40, ge=1, le=512)


JobRequest = Union[PEJobRequest, DPSGDJobRequest]


def pe_config(req: PEJobRequest) -> PEConfig:
    return PEConfig(epsilon=req.epsilon, sigma=req.sigma, iterations=req.iterations, population=req.population,
                    num_samples=req.num_samples, k=req.k, threshold=req.threshold)


def dpsgd_config(req: DPSGDJobRequest):
    from aggregation.dpsgd import DPSGDConfig

    return DPSGDConfig(epsilon=req.epsilon, noise_multiplier=req.noise_multiplier, batch_size=req.batch_size,
                       steps=req.steps, learning_rate=req.learning_rate, max_grad_norm=req.max_grad_norm,
                       max_length=req.max_length, lora_r=req.lora_r, num_samples=req.num_samples,
                       temperature=req.temperature, max_new_tokens=req.max_new_tokens)


# ---------------------------------------------------------------------------------------------
# Text generation backends for PE (RANDOM / VARIATION calls).


@dataclass
class PEBackend:
    """The three callables a PE run needs."""

    random_api: Callable[[str, int], list[str]]
    variation_api: Callable[[list[str], str], list[str]]
    embed: Callable[[Sequence[str]], Any]


#: ``factory(context, record, task_prompt) -> PEBackend``
PEBackendFactory = Callable[["WorkerContext", dict, TaskPrompt], PEBackend]


class LocalTextGenerator:
    """Sampled completions from the local causal LM (batched, left padding), loaded lazily."""

    def __init__(self, model_dir: str | None = None, batch: int = 16):
        self.model_dir = model_dir
        self.batch = batch
        self._loaded: tuple[Any, Any] | None = None
        self._lock = threading.Lock()

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._loaded is None:
                from aggregation.sources.local import load_model

                self._loaded = load_model(self.model_dir)
        return self._loaded

    def complete(self, prompts: Sequence[str], max_new_tokens: int, temperature: float) -> list[str]:
        import torch

        model, tok = self._load()
        tok.padding_side = "left"
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        out: list[str] = []
        for i in range(0, len(prompts), self.batch):
            chunk = list(prompts[i: i + self.batch])
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                # One text per line: stop a batch once every row has produced a newline.
                gen = model.generate(**enc, do_sample=True, temperature=temperature, top_p=0.95,
                                     max_new_tokens=max_new_tokens, pad_token_id=pad,
                                     stop_strings=["\n"], tokenizer=tok)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                out.append(first_line(tok.decode(row, skip_special_tokens=True)))
        return out


class LiteLLMTextGenerator:
    """Chat completions through litellm for a ``model_list`` entry (concurrent, bounded)."""

    def __init__(self, params: dict, concurrency: int = 8):
        self.params = params
        self.concurrency = concurrency

    def chat(self, messages: Sequence[list[dict]], max_new_tokens: int, temperature: float) -> list[str]:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        import litellm

        def one(msgs: list[dict]) -> str:
            resp = litellm.completion(messages=msgs, max_tokens=max_new_tokens, temperature=temperature,
                                      **self.params)
            return first_line(resp.choices[0].message.content or "")

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, messages))


def _fill(generate: Callable[[int], list[str]], n: int, rounds: int = 3) -> list[str]:
    """``n`` non-empty texts from ``generate(k)``, re-drawing empty ones a few times."""
    got = [t for t in generate(n) if t]
    for _ in range(rounds - 1):
        if len(got) >= n:
            break
        got += [t for t in generate(n - len(got)) if t]
    if len(got) < n:
        raise JobError(f"the model produced empty texts; got {len(got)} of {n}")
    return got[:n]


def default_pe_backend(ctx: "WorkerContext", record: dict, prompt: TaskPrompt) -> PEBackend:
    """RANDOM / VARIATION through the local model or a ``model_list`` entry (litellm), MiniLM embeddings."""
    params = record["params"]
    model = params.get("model") or "local"
    temperature = float(params.get("temperature", 1.0))
    max_new = int(params.get("max_new_tokens", 40))
    entry = ctx.config.model_entry(model) if ctx.config is not None else None
    if model in LOCAL_ALIASES or entry is None:
        model_dir = None if model in LOCAL_ALIASES else model
        if model_dir is None and ctx.config is not None:
            model_dir = ctx.config.server.local_model
        gen = ctx.local_generator(model_dir)

        def random_api(label: str, n: int) -> list[str]:
            return _fill(lambda k: gen.complete([random_prompt(prompt, label)] * k, max_new, temperature), n)

        def variation_api(texts: list[str], label: str) -> list[str]:
            out = gen.complete([variation_prompt(prompt, t, label) for t in texts], max_new, temperature)
            return [o or t for o, t in zip(out, texts)]  # an empty rewrite keeps its (synthetic) source
    else:
        from proxy.upstreams import resolve_params

        llm = LiteLLMTextGenerator(resolve_params(entry.litellm_params, entry.model_name))

        def random_api(label: str, n: int) -> list[str]:
            return _fill(lambda k: llm.chat([random_messages(prompt, label)] * k, max_new, temperature), n)

        def variation_api(texts: list[str], label: str) -> list[str]:
            out = llm.chat([variation_messages(prompt, t, label) for t in texts], max_new, temperature)
            return [o or t for o, t in zip(out, texts)]
    return PEBackend(random_api, variation_api, ctx.embedder())


def load_backend_factory(spec: str | None) -> PEBackendFactory:
    """``"module:attribute"`` -> a PE backend factory (default: :func:`default_pe_backend`)."""
    if not spec:
        return default_pe_backend
    import importlib

    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError("a PE backend is given as 'module:attribute'")
    return getattr(importlib.import_module(module), attr)


# ---------------------------------------------------------------------------------------------
# Worker side.


@dataclass
class WorkerContext:
    """What :func:`execute_job` needs: the store, the config and cached heavy objects."""

    store: Store
    config: Config | None = None
    pe_backend: PEBackendFactory = default_pe_backend
    heartbeat_interval: float = 5.0
    worker_name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    #: Set by the owner on shutdown; running jobs then stop at the next check and end failed.
    stopping: threading.Event = field(default_factory=threading.Event)
    _embedder: Any = None
    _generators: dict = field(default_factory=dict)

    def embedder(self) -> Any:
        if self._embedder is None:
            from aggregation.embeddings import MiniLMEmbedder

            self._embedder = MiniLMEmbedder()
        return self._embedder

    def local_generator(self, model_dir: str | None) -> LocalTextGenerator:
        key = model_dir or ""
        if key not in self._generators:
            self._generators[key] = LocalTextGenerator(model_dir)
        return self._generators[key]


class _Heartbeat:
    """Refreshes ``heartbeat_at`` of the given jobs every ``interval`` seconds on a daemon thread."""

    def __init__(self, store: Store, interval: float):
        self.store = store
        self.interval = interval
        self.ids: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dpicl-job-heartbeat", daemon=True)
        self._thread.start()

    def add(self, job_id: str) -> None:
        with self._lock:
            self.ids.add(job_id)

    def discard(self, job_id: str) -> None:
        with self._lock:
            self.ids.discard(job_id)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                ids = list(self.ids)
            for job_id in ids:
                try:
                    self.store.update_job(job_id, heartbeat_at=time.time())
                except Exception as exc:  # keep beating the others; log the type only
                    log.warning("heartbeat of job %s failed: %s", job_id, type(exc).__name__)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)


def job_prompt(record: dict) -> TaskPrompt:
    """The prompt fields stored with a job (PromptSpec's defaults for any left out)."""
    # model_construct: the fields were checked at submission; a stored task's longer
    # instruction must not fail a job whose cost is already spent.
    p = PromptSpec.model_construct(**(record.get("prompt") or {}))
    return TaskPrompt(p.instruction, p.input_prefix, p.label_prefix, tuple(sorted((p.label_words or {}).items())))


def _safe_error(exc: BaseException) -> str:
    if isinstance(exc, _SAFE_ERRORS):
        return str(exc)[:500]
    from proxy.upstreams import UpstreamError

    if isinstance(exc, UpstreamError):
        return f"upstream error {exc.status}"
    # Anything else may quote data (tokenizers, model errors, litellm): the type name only.
    return f"job failed with {type(exc).__name__} (details withheld: messages could contain data)"


def execute_job(ctx: WorkerContext, job_id: str, heartbeat: _Heartbeat | None = None) -> str:
    """Run one queued job to its end state (returned). Never raises for job failures.

    The ledger already holds the job's charges (reserved at submission), so the private rows may
    be read here. The plan is rebuilt from the record, i.e. exactly the noise that was charged.
    """
    store = ctx.store
    record = store.get_job(job_id)
    if record is None:
        log.warning("job %s vanished before it ran", job_id)
        return FAILED
    if record["state"] != QUEUED or record.get("cancel_requested"):
        if record["state"] == QUEUED:
            store.update_job(job_id, state=CANCELLED, finished_at=time.time())
            return CANCELLED
        return record["state"]
    now = time.time()
    store.update_job(job_id, state=RUNNING, started_at=now, heartbeat_at=now, worker=ctx.worker_name,
                     step="starting")
    own_beat = heartbeat is None
    beat = heartbeat or _Heartbeat(store, ctx.heartbeat_interval)
    beat.add(job_id)
    last_check = [0.0, False]

    def should_cancel() -> bool:
        if ctx.stopping.is_set():
            return True
        # Reading the record costs one store round trip; at most a few per second.
        if time.monotonic() - last_check[0] >= 0.2:
            rec = store.get_job(job_id) or {}
            last_check[0], last_check[1] = time.monotonic(), bool(rec.get("cancel_requested")) or \
                rec.get("state") in FINISHED_STATES
        return bool(last_check[1])

    def progress(fraction: float, step: str) -> None:
        store.update_job(job_id, progress=round(100.0 * fraction, 1), step=step, heartbeat_at=time.time())

    try:
        meta = store.get_dataset(record["dataset_id"])
        if meta.version != record.get("dataset_version", meta.version):
            raise JobError("the dataset changed since the job was submitted")
        rows = [Example(text, label) for text, label in store.load_rows(record["dataset_id"])]
        if record["kind"] == "pe":
            out = _run_pe(ctx, record, rows, progress, should_cancel)
        else:
            out = _run_dpsgd(ctx, record, rows, progress, should_cancel)
        current = store.get_job(job_id) or {}
        if current.get("state") != RUNNING:  # marked failed (stale) or cancelled meanwhile
            return str(current.get("state", FAILED))
        store.put_blob(f"jobs/{job_id}/synthetic.jsonl", out.pop("jsonl"))
        if "adapter" in out:
            store.put_blob(f"jobs/{job_id}/adapter.tar.gz", out.pop("adapter"))
        store.update_job(job_id, state=SUCCEEDED, progress=100.0, step="done", finished_at=time.time(), **out)
        return SUCCEEDED
    except Cancelled:
        current = store.get_job(job_id) or {}
        if ctx.stopping.is_set() and not current.get("cancel_requested"):
            store.update_job(job_id, state=FAILED, finished_at=time.time(),
                             error="interrupted: the worker shut down (the reserved privacy cost stays spent)")
            return FAILED
        if current.get("state") == RUNNING:
            store.update_job(job_id, state=CANCELLED, finished_at=time.time(), step="cancelled")
        return CANCELLED
    except Exception as exc:
        log.error("job %s failed: %s", job_id, type(exc).__name__)
        store.update_job(job_id, state=FAILED, finished_at=time.time(), error=_safe_error(exc))
        return FAILED
    finally:
        beat.discard(job_id)
        if own_beat:
            beat.stop()


def _jsonl(rows: Sequence[Example]) -> bytes:
    return "".join(json.dumps({"text": r.text, "label": r.label}, ensure_ascii=False) + "\n"
                   for r in rows if r.text).encode()


def _run_pe(ctx: WorkerContext, record: dict, rows: list[Example], progress, should_cancel) -> dict:
    from aggregation.mechanisms import Noise

    req = PEJobRequest.model_validate(record["params"])
    plan = PEPlan(pe_config(req), record["delta"], record["plan"]["labels"], record["plan"]["sigma"],
                  include_counts=False)
    prompt = job_prompt(record)
    backend = ctx.pe_backend(ctx, record, prompt)
    result = run_pe(plan, rows, backend.random_api, backend.variation_api, backend.embed,
                    Noise(record.get("seed")), label_counts=record["label_counts"],
                    progress=progress, should_cancel=should_cancel)
    return {"jsonl": _jsonl(result.rows), "rows": len(result.rows), "per_label": result.per_label,
            "seconds_per_iteration": (sum(result.iteration_seconds) / len(result.iteration_seconds))
            if result.iteration_seconds else None}


def _run_dpsgd(ctx: WorkerContext, record: dict, rows: list[Example], progress, should_cancel) -> dict:
    from aggregation.dpsgd import DPSGDPlan, run_dpsgd
    from aggregation.sources.local import load_model

    req = DPSGDJobRequest.model_validate(record["params"])
    cfg = dpsgd_config(req)
    p = record["plan"]
    plan = DPSGDPlan(cfg, record["delta"], p["labels"], record["label_counts"], p["q"], p["noise_multiplier"],
                     include_counts=False)
    model_dir = req.model if req.model not in (None, *LOCAL_ALIASES) else (
        ctx.config.server.local_model if ctx.config is not None else None)
    model, tok = load_model(model_dir)
    with tempfile.TemporaryDirectory(prefix="dpicl-dpsgd-") as tmp:
        result = run_dpsgd(plan, rows, model, tok, tmp, task=job_prompt(record), seed=record.get("seed"),
                           progress=progress, should_cancel=should_cancel)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            tar.add(str(result.adapter_dir), arcname="adapter")
    steps = result.step_seconds
    return {"jsonl": _jsonl(result.rows), "adapter": buf.getvalue(), "rows": len(result.rows),
            "per_label": result.per_label,
            "steps_per_second": (len(steps) / sum(steps)) if steps and sum(steps) > 0 else None}


# ---------------------------------------------------------------------------------------------
# Runners.


class InProcessRunner:
    """Runs jobs on a thread pool inside the server process (the embedded default)."""

    kind = "inprocess"

    def __init__(self, ctx: WorkerContext, workers: int = 1):
        self.ctx = ctx
        self.heartbeat = _Heartbeat(ctx.store, ctx.heartbeat_interval)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dpicl-job")
        self._pending: set[str] = set()
        self._lock = threading.Lock()

    def enqueue(self, job_id: str) -> None:
        # Queued jobs get heartbeats too: if this process dies they are failed, not left queued.
        self.heartbeat.add(job_id)
        with self._lock:
            self._pending.add(job_id)
        self.pool.submit(self._run, job_id)

    def _run(self, job_id: str) -> None:
        try:
            execute_job(self.ctx, job_id, self.heartbeat)
        finally:
            with self._lock:
                self._pending.discard(job_id)
            self.heartbeat.discard(job_id)

    def close(self) -> None:
        """Stop: running jobs end failed at their next check, queued ones are failed now."""
        self.ctx.stopping.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            pending = list(self._pending)
        for job_id in pending:
            rec = self.ctx.store.get_job(job_id)
            if rec is not None and rec["state"] == QUEUED:
                self.ctx.store.update_job(job_id, state=FAILED, finished_at=time.time(),
                                          error="the server shut down before the job started "
                                                "(the reserved privacy cost stays spent)")
        self.pool.shutdown(wait=True)
        self.heartbeat.stop()


class RQRunner:
    """Puts jobs on a Redis queue (RQ); ``dpicl worker`` processes execute them."""

    kind = "rq"

    def __init__(self, redis_url: str, queue: str = DEFAULT_QUEUE):
        from redis import Redis
        from rq import Queue

        self.conn = Redis.from_url(redis_url)
        self.queue = Queue(queue, connection=self.conn)

    def enqueue(self, job_id: str) -> None:
        # job_timeout=-1: DP-SGD jobs run for minutes to hours; liveness comes from heartbeats.
        self.queue.enqueue("proxy.jobs.rq_execute", job_id, job_id=f"dpicl-{job_id}", job_timeout=-1,
                           result_ttl=86400, failure_ttl=7 * 86400)

    def close(self) -> None:
        self.conn.close()


# The worker process's context: set once by run_worker() (the worker's lifespan object) and read
# by rq_execute, which RQ calls by import path in the work horse.
_WORKER_CONTEXT: WorkerContext | None = None


def rq_execute(job_id: str) -> str:
    """RQ entry point (runs in the work horse of ``dpicl worker``)."""
    if _WORKER_CONTEXT is None:
        raise RuntimeError("rq_execute runs inside 'dpicl worker' only")
    return execute_job(_WORKER_CONTEXT, job_id)


def run_worker(redis_url: str, store_url: str | None = None, config: Config | None = None,
               queue: str = DEFAULT_QUEUE, burst: bool = False, pe_backend: str | None = None,
               heartbeat_interval: float = 5.0, name: str | None = None) -> None:
    """Serve the Redis queue until stopped (``burst``: until it is empty)."""
    global _WORKER_CONTEXT
    from redis import Redis
    from rq import Queue, Worker

    from proxy.store import open_store

    store = open_store(store_url or (config.store.url if config is not None else None))
    ctx = WorkerContext(store=store, config=config, pe_backend=load_backend_factory(pe_backend),
                        heartbeat_interval=heartbeat_interval)
    _WORKER_CONTEXT = ctx
    conn = Redis.from_url(redis_url)

    class DpiclWorker(Worker):
        """Marks our job failed as soon as RQ sees its work horse die (killed, OOM)."""

        def handle_work_horse_killed(self, job: Any, retpid: Any, ret_val: Any, rusage: Any) -> None:
            job_id = (job.args or [None])[0]
            if job_id:
                rec = store.get_job(job_id)
                if rec is not None and rec["state"] not in FINISHED_STATES:
                    store.update_job(job_id, state=FAILED, finished_at=time.time(),
                                     error="the worker process died mid-job (the reserved privacy cost stays spent)")
            super().handle_work_horse_killed(job, retpid, ret_val, rusage)

    worker = DpiclWorker([Queue(queue, connection=conn)], connection=conn, name=name)
    try:
        worker.work(burst=burst, with_scheduler=False)
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------
# The manager (the app's lifespan object for jobs).


class JobManager:
    """Submission, queries, cancellation and results of jobs; owns the runner."""

    def __init__(self, store: Store, budget: Any, config: Config | None, runner: Any,
                 stale_after: float = 60.0, metrics: Any = None):
        self.store = store
        self.budget = budget
        self.config = config
        self.runner = runner
        self.stale_after = stale_after
        self.metrics = metrics  # proxy.metrics.Metrics: the spend gauges follow job reservations

    @classmethod
    def create(cls, store: Store, budget: Any, config: Config | None, redis_url: str | None = None,
               queue: str | None = None, workers: int | None = None, heartbeat_interval: float | None = None,
               stale_after: float | None = None, pe_backend: PEBackendFactory | None = None,
               metrics: Any = None) -> "JobManager":
        """In-process runner unless a queue URL is given (argument or ``jobs.queue_url``).

        Arguments override the config's ``jobs`` section (tests, embedding)."""
        settings = config.jobs if config is not None else JobSettings()
        redis_url = redis_url or settings.queue_url
        beat = heartbeat_interval or settings.heartbeat_seconds
        stale = stale_after or max(6 * beat, settings.stale_after_seconds or 0.0)
        if redis_url:
            runner: Any = RQRunner(redis_url, queue or settings.queue_name)
        else:
            ctx = WorkerContext(store=store, config=config, pe_backend=pe_backend or default_pe_backend,
                                heartbeat_interval=beat)
            runner = InProcessRunner(ctx, workers or settings.workers)
        return cls(store, budget, config, runner, stale, metrics)

    def close(self) -> None:
        self.runner.close()

    # -- submission -------------------------------------------------------------------------
    def _prompt(self, req: JobRequest) -> dict:
        if req.task and req.prompt:
            raise JobRequestError("give either task or prompt, not both")
        if req.task:
            task = None
            if self.config is not None:
                task = next((t for t in self.config.tasks if t.name == req.task), None)
            if task is None:
                spec = self.store.get_task(req.task)
                if spec is None:
                    raise JobRequestError(f"unknown task {req.task!r}")
                return {k: spec.get(k) for k in ("instruction", "input_prefix", "label_prefix", "label_words")
                        if spec.get(k) is not None}
            return {"instruction": task.instruction, "input_prefix": task.input_prefix,
                    "label_prefix": task.label_prefix, "label_words": dict(task.label_words)}
        return (req.prompt or PromptSpec()).model_dump()

    def submit(self, req: JobRequest, actor: str = "admin") -> dict:
        """Plan, reserve the full cost, record and enqueue a job. Returns the record.

        Raises NotFound (unknown dataset), JobRequestError (bad parameters) or BudgetExceeded
        (nothing reserved for the job itself; see ``BudgetService.noisy_counts`` for the counts).
        """
        from aggregation.dpsgd import plan_dpsgd

        meta = self.store.resolve_dataset(req.dataset)
        labels = list(req.labels) if req.labels else list(meta.labels)
        unknown = [lab for lab in labels if lab not in meta.labels]
        if unknown or not labels:
            raise JobRequestError(f"labels {unknown} are not labels of dataset {meta.id}" if unknown
                                  else "the dataset has no labels")
        if req.model and req.model not in LOCAL_ALIASES and not Path(req.model, "config.json").exists():
            # DP-SGD trains the weights, so it needs a local model; PE only calls the model.
            listed = self.config is not None and self.config.model_entry(req.model) is not None
            if isinstance(req, DPSGDJobRequest):
                raise JobRequestError("DP-SGD needs model 'local' or a local model directory")
            if not listed:
                raise JobRequestError("model must be 'local', a model_list name or a local model directory")
        prompt = self._prompt(req)
        job_id = "job-" + uuid.uuid4().hex[:16]
        delta = meta.budget_delta
        try:
            if isinstance(req, PEJobRequest):
                cfg = pe_config(req)
                cfg.validate()
                if req.k > req.population:
                    raise JobRequestError("k must not exceed population")
            else:
                cfg = dpsgd_config(req)
                cfg.validate()
        except ValueError as exc:
            raise JobRequestError(str(exc)) from None
        # DP label counts: charged on "*" the first time any feature needs them, then free.
        counts = self.budget.noisy_counts(meta.id, actor, reason=f"label counts ({job_id})")
        counts = {lab: float(counts.get(lab, 0.0)) for lab in labels}
        try:
            if isinstance(req, PEJobRequest):
                plan: Any = plan_pe(cfg, labels, delta, include_counts=False)
            else:
                plan = plan_dpsgd(cfg, counts, delta, include_counts=False)
        except ValueError as exc:
            raise JobRequestError(str(exc)) from None
        reservation = self.budget.reserve(meta.id, plan.charges(), actor, f"job {job_id} ({req.kind})")
        if self.metrics is not None:
            self.metrics.record_spend(meta.id, reservation.spent_after, reservation.budget_epsilon)
        now = time.time()
        record = {
            "id": job_id, "kind": req.kind, "dataset_id": meta.id, "dataset_version": meta.version,
            "state": QUEUED, "progress": 0.0, "step": "queued", "error": None,
            "epsilon_target": req.epsilon, "epsilon_job": _num(plan.epsilon()),
            "epsilon_charged": _num(reservation.epsilon), "delta": delta,
            "plan": plan.summary(), "label_counts": counts, "prompt": prompt, "seed": req.seed,
            "params": req.model_dump(exclude={"prompt"}), "actor": actor, "runner": self.runner.kind,
            "cancel_requested": False, "created_at": now, "heartbeat_at": now,
            "started_at": None, "finished_at": None, "worker": None,
        }
        self.store.put_job(job_id, record)
        try:
            self.runner.enqueue(job_id)
        except Exception as exc:
            log.error("could not enqueue job %s: %s", job_id, type(exc).__name__)
            record = self.store.update_job(job_id, state=FAILED, finished_at=time.time(),
                                           error="could not enqueue the job (the reserved privacy cost stays spent)")
        return self.store.get_job(job_id) or record

    # -- queries ----------------------------------------------------------------------------
    def _reap(self, rec: dict) -> dict:
        """Mark a job failed when its worker stopped sending heartbeats."""
        state = rec.get("state")
        watched = state == RUNNING or (state == QUEUED and rec.get("runner") == InProcessRunner.kind)
        if watched and time.time() - float(rec.get("heartbeat_at") or 0) > self.stale_after:
            return self.store.update_job(
                rec["id"], state=FAILED, finished_at=time.time(),
                error=f"the worker stopped responding (no heartbeat for {self.stale_after:g} s); "
                      "the reserved privacy cost stays spent")
        return rec

    def get(self, job_id: str) -> dict:
        rec = self.store.get_job(job_id)
        if rec is None:
            raise NotFound(f"job {job_id} not found")
        return self._reap(rec)

    def list(self) -> list[dict]:
        return [self._reap(r) for r in self.store.list_jobs()]

    def cancel(self, job_id: str) -> dict:
        rec = self.get(job_id)
        if rec["state"] in FINISHED_STATES:
            raise JobConflict(f"job {job_id} already {rec['state']}")
        if rec["state"] == QUEUED:
            return self.store.update_job(job_id, cancel_requested=True, state=CANCELLED, step="cancelled",
                                         finished_at=time.time())
        return self.store.update_job(job_id, cancel_requested=True)

    def result(self, job_id: str, part: str = "synthetic") -> tuple[bytes, str, str]:
        """``(bytes, media type, file name)`` of a finished job's result."""
        rec = self.get(job_id)
        if rec["state"] != SUCCEEDED:
            raise JobConflict(f"job {job_id} is {rec['state']}; results exist for succeeded jobs only")
        if part == "synthetic":
            key, media, name = f"jobs/{job_id}/synthetic.jsonl", "application/x-ndjson", f"{job_id}.jsonl"
        elif part == "adapter":
            if rec["kind"] != "dpsgd":
                raise JobRequestError("only DP-SGD jobs have an adapter")
            key, media, name = f"jobs/{job_id}/adapter.tar.gz", "application/gzip", f"{job_id}-adapter.tar.gz"
        else:
            raise JobRequestError("part must be 'synthetic' or 'adapter'")
        data = self.store.get_blob(key)
        if data is None:
            raise NotFound(f"the {part} result of job {job_id} is missing")
        return data, media, name


def public_view(rec: dict) -> dict:
    """The record as the API shows it (everything in it is already free of private text)."""
    keys = ("id", "kind", "dataset_id", "dataset_version", "state", "progress", "step", "error",
            "epsilon_target", "epsilon_job", "epsilon_charged", "delta", "plan", "label_counts", "seed",
            "params", "runner", "worker", "cancel_requested", "created_at", "started_at", "finished_at",
            "heartbeat_at", "rows", "per_label", "seconds_per_iteration", "steps_per_second")
    return {k: rec.get(k) for k in keys}


__all__ = [
    "BudgetExceeded", "Cancelled", "DPSGDJobRequest", "InProcessRunner", "JobConflict", "JobError", "JobManager",
    "JobRequest", "JobRequestError", "PEBackend", "PEJobRequest", "RQRunner", "WorkerContext", "default_pe_backend",
    "execute_job", "public_view", "run_worker",
]
