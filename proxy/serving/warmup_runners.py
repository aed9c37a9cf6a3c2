"""Where warm-ups run: a dedicated niced thread in the server, or the RQ queue of ``dpicl worker``.

* :class:`ThreadRunner` (no queue configured): one daemon thread per process takes warm-up ids
  from an in-memory queue and runs them one at a time. It is not the request thread pool, so a
  long generation (or 45 queued ones) never takes a thread that readiness, admin reads or cached
  task requests need. The thread lowers its own scheduling priority (Linux niceness is per
  thread; threads it creates, such as torch's intra-op pool when it first starts there, inherit it).
* :class:`RQWarmupRunner` (``jobs.queue_url`` set): warm-ups go to the same RQ queue as jobs and
  run on ``dpicl worker`` processes (:func:`rq_warmup`), so API replicas only serve.

Both keep ``heartbeat_at`` fresh on the warm-ups they hold, so a reader can settle the ones whose
process died (:meth:`proxy.serving.warmups.WarmupService.get`).

Killing ``dpicl worker``'s main process (``kill -9``) does not kill RQ's work horse (it runs in its
own session). A horse running a warm-up notices before its next token that its parent is gone,
stops, and records the warm-up ``lost`` (its charge stays); it stops refreshing the heartbeat at
the same moment, so a horse stuck elsewhere is settled by the stale-heartbeat rule. A horse killed
on its own is settled by the worker (``handle_work_horse_killed``, :mod:`proxy.jobs.worker`) or by
any reader on the same host.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from typing import Any, Callable

from proxy.config import Config
from proxy.heartbeat import Heartbeat
from proxy.logs import JsonFormatter, server_logging
from proxy.serving.warmup_executor import WarmupExecutor
from proxy.serving.warmup_owner import Owner
from proxy.serving.warmups import FAILED, QUEUED, RUNNING, recover_warmups

log = logging.getLogger("dpicl.warmups")

#: What RQ calls in the work horse, by import path.
RQ_WARMUP_ENTRY = "proxy.serving.warmup_runners.rq_warmup"
#: Niceness added to the generation thread (and worker generations); ``DPICL_WARMUP_NICE`` overrides.
GENERATION_NICE = int(os.environ.get("DPICL_WARMUP_NICE", "10"))
HEARTBEAT_SECONDS = 5.0


def lower_thread_priority(increment: int = GENERATION_NICE) -> None:
    """Add ``increment`` to the calling thread's niceness (best effort; per thread on Linux)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass


def _warmup_heartbeat(store: Any, alive: Callable[[], bool] = lambda: True) -> Heartbeat:
    """Keeps the held queued or running warm-ups' ``heartbeat_at`` fresh while ``alive()``."""
    def beat(wid: str) -> None:
        if alive():
            store.update_warmup(wid, expect=(QUEUED, RUNNING), heartbeat_at=time.time())

    return Heartbeat(beat, HEARTBEAT_SECONDS, "warmup")


class ThreadRunner:
    """Runs warm-ups one at a time on a dedicated, lower-priority thread of this process."""

    kind = "inprocess"

    def __init__(self, store: Any, execute: Callable[[str], str], nice: int = GENERATION_NICE):
        self.store = store
        self.execute = execute
        self.nice = nice
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._beat = _warmup_heartbeat(store)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="dpicl-warmup", daemon=True)
        self._thread.start()

    def submit(self, wid: str) -> None:
        if self._closed:
            raise RuntimeError("the warm-up runner is closed")
        self._beat.add(wid)
        self._queue.put(wid)

    def _loop(self) -> None:
        lower_thread_priority(self.nice)
        while True:
            wid = self._queue.get()
            if wid is None:
                return
            try:
                self.execute(wid)
            except Exception as exc:  # noqa: BLE001 - execute never raises; belt and braces
                log.error("warm-up %s crashed: %s", wid, type(exc).__name__)
            finally:
                self._beat.discard(wid)

    def close(self) -> None:
        """Stop taking work; queued warm-ups are failed now (nothing was charged for them)."""
        self._closed = True
        self._queue.put(None)
        for wid in self._beat.held():
            try:
                self.store.update_warmup(wid, expect=(QUEUED,), state=FAILED, finished_at=time.time(), error={
                    "message": "the server shut down before the warm-up started; nothing was charged",
                    "type": "server_error", "code": "server_shutdown", "status": 503})
            except Exception:  # noqa: BLE001 - best effort on shutdown
                pass
        self._beat.stop()
        # A running generation is not waited for; the thread is a daemon and dies with the process
        # (its record is marked lost when this instance starts again, or by a reader on this host).
        self._thread.join(timeout=0.5)


class RQWarmupRunner:
    """Puts warm-ups on the jobs' Redis queue (RQ); ``dpicl worker`` processes run them."""

    kind = "rq"

    def __init__(self, redis_url: str, queue_name: str):
        from redis import Redis
        from rq import Queue

        self.conn = Redis.from_url(redis_url)
        self.queue = Queue(queue_name, connection=self.conn)

    def submit(self, wid: str) -> None:
        self.queue.enqueue(RQ_WARMUP_ENTRY, wid, job_id=f"dpicl-{wid}", job_timeout=-1,
                           result_ttl=86400, failure_ttl=7 * 86400)

    def close(self) -> None:
        self.conn.close()


# -- the worker side -----------------------------------------------------------------------------
# Set by ``dpicl worker`` (install_worker) before it serves the queue; the executor is built lazily
# in the process that runs the warm-up (RQ's work horse).
_WORKER: dict[str, Any] = {}


def install_worker(config: Config | None, store_url: str | None = None, name: str | None = None) -> dict[str, int]:
    """Let this process run queued warm-ups (called by ``dpicl worker``); JSON log lines, no tqdm.

    Running warm-ups an earlier worker under the same name held (``--name``, else
    ``DPICL_INSTANCE_ID`` or the host name), or whose work horse certainly died, are marked lost
    now; returns how many.
    """
    server_logging()
    _WORKER.clear()
    config = config or Config()
    owner = Owner.current("worker", name)
    _WORKER.update(config=config, store_url=store_url, owner=owner)
    from proxy.store import open_store

    try:
        store = open_store(store_url or config.store.url)
        try:
            return recover_warmups(store, owner, adopt=None)  # in-process queues are the servers' to run
        finally:
            store.close()
    except Exception as exc:  # noqa: BLE001 - a store down now: readers settle them (heartbeat) later
        log.warning("warm-up recovery at start-up failed: %s", type(exc).__name__)
        return {"lost": 0, "requeued": 0}


def _process_logging() -> None:
    """JSON lines written directly by this process: RQ forks a work horse per job, and the parent's
    log queue thread does not exist in the child (its records would never be written)."""
    logger = logging.getLogger("dpicl")
    if any(getattr(h, "_dpicl_pid", None) == os.getpid() for h in logger.handlers):
        return
    for h in [h for h in logger.handlers if getattr(h, "_dpicl", False)]:
        logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._dpicl = True  # type: ignore[attr-defined]
    handler._dpicl_pid = os.getpid()  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _worker_executor() -> WarmupExecutor:
    ex = _WORKER.get("executor")
    if ex is not None and _WORKER.get("pid") == os.getpid():
        return ex
    if "config" not in _WORKER:
        raise RuntimeError("rq_warmup runs inside 'dpicl worker' only")
    from aggregation.embeddings import MiniLMEmbedder
    from proxy.budget import BudgetService
    from proxy.metrics import Metrics
    from proxy.serving.generators import Generators
    from proxy.serving.warmup import Warmup
    from proxy.store import open_store

    config: Config = _WORKER["config"]
    store = open_store(_WORKER.get("store_url") or config.store.url)
    metrics = Metrics()
    warmup = Warmup(store, BudgetService(store), metrics, Generators(config), MiniLMEmbedder())
    ex = WarmupExecutor(store, warmup, metrics, worker=f"rq:{os.uname().nodename}:{os.getpid()}",
                        owner=_WORKER.get("owner"), still_owner=_parent_alive())
    _WORKER.update(executor=ex, pid=os.getpid())
    return ex


def _parent_alive() -> Callable[[], bool]:
    """True while the process that forked this one (the worker's main process) is alive: an
    orphan is re-parented, so its parent PID changes."""
    parent = os.getppid()
    return lambda: os.getppid() == parent


def rq_warmup(wid: str) -> str:
    """RQ entry point: run one queued warm-up at lower priority (in ``dpicl worker``'s work horse)."""
    _process_logging()
    ex = _worker_executor()
    lower_thread_priority()
    beat = _warmup_heartbeat(ex.store, ex.still_owner)
    beat.add(wid)
    try:
        return ex.run(wid)
    finally:
        beat.stop()

