"""The job manager, the app's lifespan object for offline jobs (Private Evolution, DP-SGD):
submission, queries, cancellation and results; it owns the runner.

Life of a job
-------------
1. :meth:`JobManager.submit` validates the request, takes the dataset's DP label counts
   (``BudgetService.noisy_counts``: charged once on ``"*"``, then free), plans the job from public
   quantities only (``aggregation.pe.plan_pe`` / ``aggregation.dpsgd.plan_dpsgd``: calibrated
   sigma / noise multiplier, sampling rate), **reserves the full cost in the ledger** (refused with
   ``BudgetExceeded`` when it does not fit), writes the job record and only then enqueues it.
2. A runner (:mod:`proxy.jobs.runners`) executes :func:`proxy.jobs.execute.execute_job`:
   in-process (a thread pool owned by the app's lifespan, the embedded default) or on a Redis
   queue built on RQ, served by ``dpicl worker`` processes on any number of machines sharing the
   queue and a store.
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

import logging
import time
import uuid
from pathlib import Path
from typing import Any

from aggregation.pe import allocate, plan_pe
from proxy.budget import finite_or_none
from proxy.config import Config, JobSettings
from proxy.task_config import LOCAL_ALIASES
from proxy.jobs.backends import PEBackendFactory, default_pe_backend
from proxy.jobs.execute import WorkerContext
from proxy.jobs.requirements import check_job_requirements
from proxy.jobs.requests import CANCELLED, FAILED, FINISHED_STATES, QUEUED, RUNNING, SUCCEEDED, DPSGDJobRequest, \
    JobConflict, JobRequest, JobRequestError, PEJobRequest, PromptSpec, dpsgd_config, pe_config
from proxy.jobs.runners import InProcessRunner, RQRunner
from proxy.store.base import NotFound, Store

log = logging.getLogger("dpicl.jobs")


class JobManager:
    """Submission, queries, cancellation and results of jobs; owns the runner."""

    def __init__(self, store: Store, budget: Any, config: Config | None, runner: Any,
                 stale_after: float = 60.0, metrics: Any = None, default_backend: bool = True):
        self.store = store
        self.budget = budget
        self.config = config
        self.runner = runner
        self.stale_after = stale_after
        self.metrics = metrics  # proxy.metrics.Metrics: the spend gauges follow job reservations
        #: False when PE runs through a custom backend factory, which brings its own dependencies.
        self.default_backend = default_backend

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
        # An RQ worker's backend is chosen on the worker (--pe-backend); the server checks the default's needs.
        return cls(store, budget, config, runner, stale, metrics,
                   default_backend=bool(redis_url) or pe_backend in (None, default_pe_backend))

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

        Raises NotFound (unknown dataset), JobRequestError (bad parameters), MissingExtra (this
        install cannot run the kind: nothing charged, not even the label counts) or BudgetExceeded
        (nothing reserved for the job itself; see ``BudgetService.noisy_counts`` for the counts).
        """
        from aggregation.dpsgd import plan_dpsgd

        meta = self.store.resolve_dataset(req.dataset)
        if req.seed is not None and not meta.public:
            # Reproducible noise on private data would let anyone holding the seed remove it.
            raise JobRequestError("'seed' is only allowed on datasets marked public: the noise on private data "
                                  "must come from the system's CSPRNG")
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
        # The default backend generates with the local model unless the model is a model_list entry.
        local = self.config is None or self.config.model_entry(req.model or "local") is None
        check_job_requirements(req.kind, local_generation=local, default_backend=self.default_backend)
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
        reservation = self.budget.reserve(meta.id, plan.charges(), actor, f"job {job_id} ({req.kind})",
                                          kind="job", ref=job_id)
        if self.metrics is not None:
            self.metrics.record_spend(meta.id, reservation.spent_after, reservation.budget_epsilon)
        now = time.time()
        record = {
            "id": job_id, "kind": req.kind, "dataset_id": meta.id, "dataset_version": meta.version,
            "state": QUEUED, "progress": 0.0, "step": "queued", "error": None,
            "epsilon_target": req.epsilon, "epsilon_job": finite_or_none(plan.epsilon()),
            "epsilon_charged": finite_or_none(reservation.epsilon), "delta": delta,
            "plan": plan.summary(), "label_counts": counts, "prompt": prompt, "seed": req.seed,
            "label_decisions": label_decisions(req, counts),
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


def label_decisions(req: JobRequest, counts: dict[str, float]) -> dict[str, dict[str, str]]:
    """What the job does with each label and which rule decided it: from the DP label counts and
    public settings only (no label's fate depends on exact private counts)."""
    if isinstance(req, PEJobRequest):
        alloc = allocate(counts, req.num_samples)
        return {lab: {"decision": "private" if alloc[lab] > 0 else "skip",
                      "rule": f"{alloc[lab]} of {req.num_samples} samples, proportional to the noisy counts"}
                for lab in sorted(counts)}
    return {lab: {"decision": "private", "rule": "trained on every unit; q = batch_size / sum of noisy counts"}
            for lab in sorted(counts)}
