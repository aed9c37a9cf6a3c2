"""Runners, which execute queued jobs: in-process (a thread pool owned by the app's lifespan, the
embedded default) or on a Redis queue built on RQ, served by ``dpicl worker`` processes
(:mod:`proxy.jobs.worker`) on any number of machines sharing the queue and a store.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from proxy.config import DEFAULT_JOB_QUEUE
from proxy.jobs.execute import WorkerContext, execute_job, job_heartbeat
from proxy.jobs.requests import FAILED, QUEUED

DEFAULT_QUEUE = DEFAULT_JOB_QUEUE
#: What RQ calls in the work horse, by import path (:func:`proxy.jobs.worker.rq_execute`).
RQ_ENTRY = "proxy.jobs.worker.rq_execute"


class InProcessRunner:
    """Runs jobs on a thread pool inside the server process (the embedded default)."""

    kind = "inprocess"

    def __init__(self, ctx: WorkerContext, workers: int = 1):
        self.ctx = ctx
        self.heartbeat = job_heartbeat(ctx.store, ctx.heartbeat_interval)
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
        self.heartbeat.stop(join=True)


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
        self.queue.enqueue(RQ_ENTRY, job_id, job_id=f"dpicl-{job_id}", job_timeout=-1,
                           result_ttl=86400, failure_ttl=7 * 86400)

    def close(self) -> None:
        self.conn.close()
