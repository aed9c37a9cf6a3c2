"""Warm-ups as stored resources: queued, run on their own executor, observable, cancellable.

A warm-up is the charged generation of one task's demonstration set (:mod:`proxy.serving.warmup`).
Its record lives in the store, so every replica sees it (``GET /admin/warmups``):

* ``queued``: recorded, nothing charged. :meth:`WarmupService.start` prices it first (the cost in
  the 202 answer) and refuses at once what does not fit the budget now. Queued warm-ups of the same
  cache key are deduplicated in the store. A queued warm-up can be cancelled (compare-and-set, so a
  cancel and a worker starting it cannot both win).
* ``running``: the executor took it (compare-and-set ``queued -> running``) and
  :meth:`Warmup.generate` reserves its cost before any private row is read. So a crash with many
  warm-ups queued costs at most the running one.
* ``done`` / ``failed`` / ``cancelled``: finished; ``result`` or ``error`` (messages are ours and
  carry no private text).

Executors (:mod:`proxy.serving.warmup_runners`): without Redis, one dedicated niced thread per
process (never the request thread pool; nobody holds a request thread while a warm-up waits for
it); with ``jobs.queue_url`` set, the RQ queue served by ``dpicl worker`` processes, so API
replicas only serve. Progress (tokens of the charged maximum done, seconds, an estimate) goes to
the record about once a second and to the server log as JSON lines.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from typing import Any, Awaitable, Callable

import anyio

from proxy.config import TaskConfig
from proxy.errors import APIError
from proxy.logs import log_event
from proxy.metrics import Metrics
from proxy.serving.tasks import task_labels
from proxy.serving.warmup import Prepared, Warmup, generation_error
from proxy.store.base import NotFound, Store

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
#: Seconds between progress writes to the store (and JSON progress log lines: every 5th).
PROGRESS_EVERY = 1.0
#: A queued (in-process) or running warm-up whose heartbeat is older than this is failed on read.
STALE_AFTER = 90.0


def new_warmup_id() -> str:
    return "wu_" + secrets.token_hex(8)


def error_dict(exc: APIError) -> dict[str, Any]:
    """The stored form of a failure (the message is one of ours: no private text)."""
    return {"message": exc.message, "type": exc.type, "code": exc.code, "status": exc.status}


def result_view(task: str, result: dict[str, Any]) -> dict[str, Any]:
    """The demonstration-set part of a finished warm-up (what ``wait`` used to answer)."""
    payload = result.get("payload") or {}
    out = {
        "task": task, "key": result.get("key"), "cached": bool(result.get("cached")),
        "charged": bool(result.get("charged")), "epsilon": payload.get("epsilon"), "delta": payload.get("delta"),
        "dataset_id": payload.get("dataset_id"), "demonstrations": payload.get("demos", []),
        "empty_labels": payload.get("empty_labels", []),
        # Which rule applied to each label (private / public fallback / skip), from the DP count.
        "decisions": payload.get("decisions"),
    }
    for k in ("epsilon_cost", "spent_epsilon", "remaining_epsilon", "timings"):
        if k in result:
            out[k] = result[k]
    return out


def public_view(rec: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """The API view of a record (admin-only: progress speed depends on when generation stopped)."""
    now = time.time() if now is None else now
    started, finished = rec.get("started_at"), rec.get("finished_at")
    elapsed = None
    if started is not None:
        elapsed = round(max(0.0, (finished or now) - started), 3)
    done, total = int(rec.get("tokens_done") or 0), int(rec.get("tokens_total") or 0)
    eta = None
    if rec.get("state") == RUNNING and elapsed and done > 0 and total >= done:
        eta = round(elapsed / done * (total - done), 1)
    elif rec.get("state") == DONE:
        eta = 0.0
    return {
        "object": "warmup", "id": rec["id"], "task": rec.get("task"), "dataset": rec.get("dataset_id"),
        "state": rec.get("state"), "tokens_done": done, "tokens_total": total, "seconds_elapsed": elapsed,
        "eta_seconds": eta, "epsilon_cost": rec.get("epsilon_cost"), "charged": bool(rec.get("charged")),
        "created_at": rec.get("created_at"), "started_at": started, "finished_at": finished,
        "actor": rec.get("actor"), "runner": rec.get("runner"), "key": rec.get("key"),
        "result": rec.get("result"), "error": rec.get("error"),
    }


class WarmupExecutor:
    """Runs one queued warm-up to its end (the body of every runner; blocking, never raises)."""

    def __init__(self, store: Store, warmup: Warmup, metrics: Metrics | None = None, worker: str = "inprocess"):
        self.store = store
        self.warmup = warmup
        self.metrics = metrics
        self.worker = worker

    def _finish(self, wid: str, **fields: Any) -> dict[str, Any] | None:
        return self.store.update_warmup(wid, expect=(RUNNING,), finished_at=time.time(), **fields)

    def run(self, wid: str) -> str:
        """Take the warm-up (``queued -> running``), generate, record the outcome; returns the state."""
        now = time.time()
        try:
            rec = self.store.update_warmup(wid, expect=(QUEUED,), state=RUNNING, started_at=now, heartbeat_at=now,
                                           worker=self.worker)
        except NotFound:
            return FAILED
        if rec is None:  # cancelled (or taken) meanwhile
            current = self.store.get_warmup(wid) or {}
            return str(current.get("state", FAILED))
        task_name = rec.get("task", "?")
        started = time.perf_counter()
        last = [0.0, 0]

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
            task = TaskConfig.model_validate(rec["task_spec"])
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
                                              progress=progress, reserved=reserved)
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


class WarmupService:
    """Creating, listing, waiting for and cancelling warm-ups (the API side; async)."""

    def __init__(self, store: Store, warmup: Warmup, runner: Any):
        self.store = store
        self.warmup = warmup
        self.runner = runner

    def close(self) -> None:
        self.runner.close()

    # -- creation ---------------------------------------------------------------------------
    def _create_sync(self, task: TaskConfig, prep: Prepared, actor: str, admin: bool) -> tuple[dict[str, Any], bool]:
        epsilon_cost = None
        if admin:
            # The cost that will be charged, stated now; refused now when it does not fit today.
            # (For a client-triggered warm-up the estimate uses the exact row count, which the
            # client must not learn from a refusal: its cost is checked when it starts.)
            price = self.warmup.price(task, prep, actor)
            epsilon_cost = price["epsilon_cost"]
            if not price["fits"]:
                remaining = price.get("remaining_epsilon")
                raise APIError(402, f"privacy budget exceeded: this warm-up needs about epsilon "
                                    f"{_fmt(epsilon_cost)} but only {_fmt(remaining)} of "
                                    f"{_fmt(price.get('budget_epsilon'))} remains on dataset {prep.meta.id}",
                               "budget_exceeded")
        now = time.time()
        record = {
            "id": new_warmup_id(), "task": task.name, "task_spec": task.model_dump(mode="json"),
            "dataset_id": prep.meta.id, "key": prep.key, "state": QUEUED, "actor": actor, "admin": admin,
            "generator": self.warmup.generators.generator_id(task),
            "tokens_done": 0, "tokens_total": len(prep.labels) * task.shots * task.generation.max_tokens,
            "epsilon_cost": epsilon_cost, "charged": False, "runner": self.runner.kind,
            "created_at": now, "heartbeat_at": now, "started_at": None, "finished_at": None,
            "result": None, "error": None,
        }
        rec, created = self.store.create_warmup(record, dedupe=prep.key)
        if created:
            log_event("warmup.queued", warmup_id=rec["id"], task=task.name, actor=actor)
        return rec, created

    def _cached_sync(self, task: TaskConfig, prep: Prepared, actor: str, payload: dict[str, Any]) -> dict[str, Any]:
        """A finished record for a set that is already cached (charged nothing)."""
        now = time.time()
        total = len(prep.labels) * task.shots * task.generation.max_tokens
        record = {
            "id": new_warmup_id(), "task": task.name, "dataset_id": prep.meta.id, "key": prep.key, "state": DONE,
            "actor": actor, "tokens_done": total, "tokens_total": total, "epsilon_cost": 0.0, "charged": False,
            "runner": self.runner.kind, "created_at": now, "started_at": now, "finished_at": now, "error": None,
            "result": result_view(task.name, {"key": prep.key, "cached": True, "charged": False, "payload": payload}),
        }
        rec, _ = self.store.create_warmup(record)
        return rec

    def recent_failure(self, wid: str | None, within: float) -> dict[str, Any] | None:
        """The record of ``wid`` if it failed less than ``within`` seconds ago."""
        last = self.store.get_warmup(wid) if wid else None
        if last is not None and last["state"] == FAILED and time.time() - float(last.get("finished_at") or 0) < within:
            return last
        return None

    async def start(self, task: TaskConfig, prep: Prepared, actor: str, admin: bool = True,
                    unless_failed: tuple[str | None, float] = (None, 0.0)) -> tuple[dict[str, Any], bool]:
        """Queue a warm-up (or join the active one of the same set); returns ``(record, created)``.

        ``unless_failed=(id, seconds)``: if warm-up ``id`` failed within ``seconds`` (checked again
        after this one is recorded, as it may have failed meanwhile), withdraw the new one and
        raise that failure instead (client-triggered warm-ups do not retry a doomed set per request).
        """
        payload = await anyio.to_thread.run_sync(self.store.get_demos, prep.key)
        if payload is not None:
            return await anyio.to_thread.run_sync(self._cached_sync, task, prep, actor, payload), False
        prev, within = unless_failed
        failed = await anyio.to_thread.run_sync(self.recent_failure, prev, within)
        if failed is not None:
            raise_failure(failed)
        rec, created = await anyio.to_thread.run_sync(self._create_sync, task, prep, actor, admin)
        if created and prev is not None:
            failed = await anyio.to_thread.run_sync(self.recent_failure, prev, within)
            if failed is not None:
                await anyio.to_thread.run_sync(lambda: self.store.update_warmup(
                    rec["id"], expect=(QUEUED,), state=CANCELLED, finished_at=time.time()))
                raise_failure(failed)
        if created:
            try:
                await anyio.to_thread.run_sync(self.runner.submit, rec["id"])
            except Exception as exc:  # noqa: BLE001 - e.g. the queue is unreachable
                err = APIError(503, f"could not queue the warm-up ({type(exc).__name__}); nothing was charged",
                               "queue_unavailable")
                await anyio.to_thread.run_sync(lambda: self.store.update_warmup(
                    rec["id"], expect=(QUEUED,), state=FAILED, finished_at=time.time(), error=error_dict(err)))
                raise err from None
        return rec, created

    async def wait(self, wid: str, timeout: float | None = None,
                   gone: Callable[[], Awaitable[bool]] | None = None) -> dict[str, Any]:
        """Poll the record until it is finished (holds no thread while waiting). Stops early when
        ``gone()`` says the client left (the warm-up goes on; a server shutting down is not held)."""
        delay, deadline = 0.05, (time.monotonic() + timeout) if timeout else math.inf
        while True:
            rec = await anyio.to_thread.run_sync(self.get, wid)
            if rec["state"] in FINISHED or time.monotonic() >= deadline or (gone is not None and await gone()):
                return rec
            await asyncio.sleep(delay)
            delay = min(0.5, delay * 1.5)

    # -- queries ----------------------------------------------------------------------------
    def _reap(self, rec: dict[str, Any]) -> dict[str, Any]:
        """Fail a warm-up whose executor stopped beating (the server or worker died)."""
        state = rec.get("state")
        watched = state == RUNNING or (state == QUEUED and rec.get("runner") == "inprocess")
        if watched and time.time() - float(rec.get("heartbeat_at") or 0) > STALE_AFTER:
            note = "its cost stays spent" if rec.get("charged") else "nothing was charged"
            err = {"message": f"the process running the warm-up stopped responding; {note}",
                   "type": "server_error", "code": "warmup_lost", "status": 500}
            new = self.store.update_warmup(rec["id"], expect=(state,), state=FAILED, finished_at=time.time(),
                                           error=err)
            return new or self.store.get_warmup(rec["id"]) or rec
        return rec

    def get(self, wid: str) -> dict[str, Any]:
        rec = self.store.get_warmup(wid)
        if rec is None:
            raise NotFound(f"warm-up {wid} not found")
        return self._reap(rec)

    def list(self, limit: int = 200) -> list[dict[str, Any]]:
        return [self._reap(r) for r in self.store.list_warmups(limit)]

    def latest_for(self, key: str, limit: int = 200) -> dict[str, Any] | None:
        """The newest warm-up of a cache key among the last ``limit`` warm-ups."""
        return next((r for r in self.list(limit) if r.get("key") == key), None)

    def cancel(self, wid: str) -> dict[str, Any]:
        """Cancel a queued warm-up (409 once it runs: its cost may already be charged)."""
        rec = self.get(wid)
        new = self.store.update_warmup(wid, expect=(QUEUED,), state=CANCELLED, finished_at=time.time())
        if new is None:
            current = self.store.get_warmup(wid) or rec
            raise APIError(409, f"warm-up {wid} is {current.get('state')}; only queued warm-ups can be cancelled",
                           "warmup_not_queued")
        log_event("warmup.cancelled", warmup_id=wid, task=new.get("task"))
        return new


def raise_failure(rec: dict[str, Any]) -> None:
    """Raise the recorded error of a failed warm-up as the APIError it was (for ``wait``)."""
    err = rec.get("error") or {}
    if rec.get("state") == FAILED:
        raise APIError(int(err.get("status") or 500), str(err.get("message") or "the warm-up failed"),
                       err.get("code") or "warmup_failed", err.get("type"))
    if rec.get("state") == CANCELLED:
        raise APIError(409, f"warm-up {rec['id']} was cancelled", "warmup_cancelled")


def _fmt(x: Any) -> str:
    return f"{x:.2f}" if isinstance(x, (int, float)) and math.isfinite(x) else "infinity"

