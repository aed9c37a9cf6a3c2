"""Running one queued warm-up to its end: take it, generate (stoppable), record the outcome.

:class:`WarmupExecutor` is the body of every runner (:mod:`proxy.serving.warmup_runners`): the
server's warm-up thread and the RQ work horse of ``dpicl worker``. It takes the record with a
compare-and-set (``queued -> running``, stamped with its owner), writes progress about once a
second, and asks, before the reservation and before every token, whether to stop: the record asks
for a cancel (polled every :data:`CANCEL_POLL` seconds) or the process it works for is gone (an RQ
work horse whose worker died). A stop after the reservation keeps the charge and says so.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

from proxy.task_config import stored_task
from proxy.errors import APIError
from proxy.logs import log_event
from proxy.metrics import Metrics
from proxy.serving.tasks import task_labels
from proxy.serving.warmup import Prepared, Stopped, Warmup, generation_error
from proxy.serving.warmup_owner import Owner
from proxy.serving.warmups import (
    CANCELLED, DONE, FAILED, LOST, QUEUED, RUNNING, SPENT_NOTE, error_dict, lost_error, result_view,
)
from proxy.store.base import NotFound, Store

#: Seconds between progress writes to the store (and JSON progress log lines: every 5th).
PROGRESS_EVERY = 1.0
#: Seconds between a running generation's looks at its record for a cancel request.
CANCEL_POLL = 0.2


class WarmupExecutor:
    """Runs one queued warm-up to its end (the body of every runner; blocking, never raises)."""

    def __init__(self, store: Store, warmup: Warmup, metrics: Metrics | None = None, worker: str = "inprocess",
                 owner: Owner | None = None, still_owner: Callable[[], bool] | None = None):
        self.store = store
        self.warmup = warmup
        self.metrics = metrics
        self.worker = worker
        self.owner = owner or Owner.current("server")
        #: False once the process this one works for is gone (an RQ work horse whose worker died).
        self.still_owner = still_owner or (lambda: True)

    def _stopper(self, wid: str, why: list[str]) -> Callable[[], bool]:
        """``should_stop`` of one run: the owner is gone, or the record asks for a cancel."""
        polled = [0.0]

        def should_stop() -> bool:
            if not self.still_owner():
                why.append("owner")
                return True
            now = time.monotonic()
            if now - polled[0] < CANCEL_POLL:
                return False
            polled[0] = now
            try:
                cur = self.store.get_warmup(wid) or {}
            except Exception:  # noqa: BLE001 - a store hiccup is no reason to stop
                return False
            if cur.get("cancel_requested") or cur.get("state") != RUNNING:
                # "gone": someone else settled the record (marked it lost): just stop.
                why.append("cancel" if cur.get("state") == RUNNING else "gone")
                return True
            return False

        return should_stop

    def _stopped(self, wid: str, task_name: str, exc: Stopped, why: list[str], total: int) -> str:
        """Record a generation that stopped on request (cancel) or because its owner died."""
        done = min(exc.tokens_done, total) if total else exc.tokens_done
        fields: dict[str, Any] = {"tokens_done": done}
        if exc.charged:
            fields["charged"] = True
        if why and why[0] == "gone":
            log_event("warmup.stopped", warmup_id=wid, task=task_name, tokens_done=done, charged=exc.charged)
            current = self.store.get_warmup(wid) or {}
            return str(current.get("state", LOST))
        if why and why[0] == "owner":
            state = LOST
            err = lost_error({"charged": exc.charged, "started_at": 1 if exc.charged else None},
                             f"the worker's main process died; its work horse stopped at token {done} of {total}")
        else:
            state = CANCELLED
            where = f"at token {done} of {total}" if exc.charged else "before anything was charged"
            note = SPENT_NOTE if exc.charged else "nothing was charged"
            err = {"message": f"cancelled while running ({where}); {note}", "type": "invalid_request_error",
                   "code": "warmup_cancelled", "status": 409}
        self._finish(wid, state=state, error=err, **fields)
        self._count(task_name, "cancelled" if state == CANCELLED else "lost")
        log_event(f"warmup.{state}", warmup_id=wid, task=task_name, tokens_done=done, charged=exc.charged)
        return state

    def _finish(self, wid: str, **fields: Any) -> dict[str, Any] | None:
        return self.store.update_warmup(wid, expect=(RUNNING,), finished_at=time.time(), **fields)

    def run(self, wid: str) -> str:
        """Take the warm-up (``queued -> running``), generate, record the outcome; returns the state."""
        now = time.time()
        try:
            rec = self.store.update_warmup(wid, expect=(QUEUED,), state=RUNNING, started_at=now, heartbeat_at=now,
                                           worker=self.worker, **self.owner.fields())
        except NotFound:
            return FAILED
        if rec is None:  # cancelled (or taken) meanwhile
            current = self.store.get_warmup(wid) or {}
            return str(current.get("state", FAILED))
        task_name = rec.get("task", "?")
        started = time.perf_counter()
        last = [0.0, 0]
        why: list[str] = []

        def progress(done: int, total: int) -> None:
            t = time.perf_counter()
            if t - last[0] < PROGRESS_EVERY and done < total:
                return
            last[0] = t
            last[1] += 1
            self.store.update_warmup(wid, tokens_done=done, tokens_total=total, heartbeat_at=time.time())
            if last[1] % 5 == 1 or done >= total:
                elapsed = t - started
                eta = round(elapsed / done * (total - done), 1) if done else None
                log_event("warmup.progress", warmup_id=wid, task=task_name, tokens_done=done, tokens_total=total,
                          seconds=round(elapsed, 1), eta_seconds=eta)

        def reserved(epsilon: float) -> None:
            self.store.update_warmup(wid, charged=True,
                                     epsilon_cost=float(epsilon) if math.isfinite(epsilon) else None)
            log_event("warmup.started", warmup_id=wid, task=task_name)

        try:
            task = stored_task(rec["task_spec"])
            try:
                meta = self.store.get_dataset(rec["dataset_id"])
            except NotFound:
                raise APIError(409, f"dataset {rec['dataset_id']} was deleted before the warm-up started",
                               "dataset_missing") from None
            generator = self.warmup.generators.generator_id(task)
            if rec.get("generator") and rec["generator"] != generator:
                # The set is cached under the server's generator: a worker configured with another
                # model must not fill that key with its own output.
                raise APIError(409, f"this worker's generator ({generator}) is not the one the warm-up was "
                                    f"queued for ({rec['generator']}); nothing was charged", "generator_mismatch")
            prep = Prepared(meta, task_labels(task, meta), rec["key"])
            cached = self.store.get_demos(prep.key)
            if cached is not None:  # another warm-up of the same set finished first: nothing to charge
                result = {"key": prep.key, "cached": True, "charged": False, "payload": cached}
            else:
                result = self.warmup.generate(task, prep, rec.get("actor", "admin"), bool(rec.get("admin", True)),
                                              progress=progress, reserved=reserved,
                                              should_stop=self._stopper(wid, why))
        except Stopped as exc:
            return self._stopped(wid, task_name, exc, why, int(rec.get("tokens_total") or 0))
        except APIError as exc:
            self._count(task_name, "refused")
            self._finish(wid, state=FAILED, error=error_dict(exc))
            log_event("warmup.failed", warmup_id=wid, task=task_name, status=exc.status, code=exc.code)
            return FAILED
        except Exception as exc:  # noqa: BLE001 - mapped to a clean error (type name only)
            err = generation_error(exc)
            self._count(task_name, "failed")
            self._finish(wid, state=FAILED, error=error_dict(err))
            log_event("warmup.failed", warmup_id=wid, task=task_name, status=err.status, code=err.code)
            return FAILED
        self._count(task_name, "generated" if result.get("charged") else "cached")
        total = int((rec.get("tokens_total") or 0))
        self._finish(wid, state=DONE, result=result_view(task_name, result), tokens_done=total,
                     charged=bool(result.get("charged")))
        log_event("warmup.done", warmup_id=wid, task=task_name, seconds=round(time.perf_counter() - started, 1),
                  charged=bool(result.get("charged")))
        return DONE

    def _count(self, task: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.demo_generations.labels(task, outcome).inc()
