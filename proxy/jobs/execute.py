"""Running one job (:func:`execute_job`, the same in every runner) and what it runs with: the
worker's context and the heartbeat that shows a job is alive.

The ledger already holds a job's charges when it runs (reserved at submission), so the private rows
may be read here; the plan is rebuilt from the record, i.e. exactly the noise that was charged.
Records and errors hold no private text: an exception's message could quote a record, so only
messages of our own errors and the type names of all others are stored.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence


from aggregation.mechanisms import Noise
from aggregation.pe import Cancelled, PEPlan, run_pe
from aggregation.prompts import Example
from aggregation.units import one_row_per_unit
from proxy.config import Config
from proxy.task_config import LOCAL_ALIASES
from proxy.heartbeat import Heartbeat
from proxy.jobs.backends import LocalTextGenerator, PEBackendFactory, default_pe_backend
from proxy.jobs.requests import CANCELLED, FAILED, FINISHED_STATES, QUEUED, RUNNING, SUCCEEDED, DPSGDJobRequest, \
    JobError, JobRequestError, PEJobRequest, dpsgd_config, job_prompt, pe_config
from proxy.store.base import Store
from proxy.upstreams.base import UpstreamError

log = logging.getLogger("dpicl.jobs")

_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,99}")
#: Exception types whose messages we write into job records (ours, known to hold no data).
_SAFE_ERRORS = (JobError, JobRequestError)


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


def job_heartbeat(store: Store, interval: float) -> Heartbeat:
    """Keeps the held jobs' ``heartbeat_at`` fresh every ``interval`` seconds."""
    return Heartbeat(lambda job_id: store.update_job(job_id, heartbeat_at=time.time()), interval, "job")


def _safe_error(exc: BaseException) -> str:
    if isinstance(exc, _SAFE_ERRORS):
        return str(exc)[:500]
    if isinstance(exc, UpstreamError):
        return f"upstream error {exc.status}"
    if isinstance(exc, ImportError) and isinstance(exc.name, str) and _MODULE.fullmatch(exc.name):
        # A module name is code, not data: say what is missing (the submission check should have caught it).
        return f"job failed with {type(exc).__name__}: module {exc.name} is not installed (details withheld)"
    # Anything else may quote data (tokenizers, model errors, litellm): the type name only.
    return f"job failed with {type(exc).__name__} (details withheld: messages could contain data)"


def execute_job(ctx: WorkerContext, job_id: str, heartbeat: Heartbeat | None = None) -> str:
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
    beat = heartbeat or job_heartbeat(store, ctx.heartbeat_interval)
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
        # One row per privacy unit (drawn uniformly from its rows of its label): PE and DP-SGD
        # account per row, so a unit must hold exactly one (aggregation.units.one_row_per_unit).
        seed = record.get("seed")
        noise = Noise(seed) if seed is not None else None  # seeds only on public data; else CSPRNG
        rows = one_row_per_unit([Example(t, lab, unit=u) for t, lab, u in store.load_rows(record["dataset_id"], units=True)],
                                meta.labels, noise)
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
            beat.stop(join=True)


def _jsonl(rows: Sequence[Example]) -> bytes:
    return "".join(json.dumps({"text": r.text, "label": r.label}, ensure_ascii=False) + "\n"
                   for r in rows if r.text).encode()


def _run_pe(ctx: WorkerContext, record: dict, rows: list[Example], progress, should_cancel) -> dict:
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
