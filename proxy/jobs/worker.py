"""``dpicl worker``: serve the Redis queue (RQ) and execute the jobs it hands out.

Jobs are enqueued by import path (:data:`proxy.jobs.runners.RQ_ENTRY`), so this module's
:func:`rq_execute` is what RQ calls in the work horse.
"""

from __future__ import annotations

import time
from typing import Any

from proxy.config import Config
from proxy.jobs.backends import load_backend_factory
from proxy.jobs.execute import WorkerContext, execute_job
from proxy.jobs.requests import FAILED, FINISHED_STATES
from proxy.jobs.runners import DEFAULT_QUEUE


# The worker process's context: set once by run_worker() (the worker's lifespan object) and read
# by rq_execute, which RQ calls by import path in the work horse.
_WORKER_CONTEXT: WorkerContext | None = None


def rq_execute(job_id: str) -> str:
    """RQ entry point (runs in the work horse of ``dpicl worker``)."""
    if _WORKER_CONTEXT is None:
        raise RuntimeError("rq_execute runs inside 'dpicl worker' only")
    return execute_job(_WORKER_CONTEXT, job_id)


def _warmup_horse_killed(store: Any, warmup_id: str) -> None:
    """Mark a warm-up whose work horse was killed lost at once (its reserved cost stays spent)."""
    rec = store.get_warmup(warmup_id)
    if rec is None or rec.get("state") not in ("queued", "running"):
        return
    if rec.get("charged"):
        note = "its epsilon cost stays spent: it may have read rows before it stopped"
    elif rec.get("state") == "running":
        note = "any epsilon it reserved before it was lost stays spent (see the dataset's ledger)"
    else:
        note = "nothing was charged"
    store.update_warmup(warmup_id, expect=("queued", "running"), state="lost", finished_at=time.time(), error={
        "message": f"the worker's work horse running the warm-up was killed; {note}", "type": "server_error",
        "code": "warmup_lost", "status": 500})


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
            if job_id and str(job.func_name).endswith(".rq_warmup"):
                _warmup_horse_killed(store, job_id)
            elif job_id:
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
