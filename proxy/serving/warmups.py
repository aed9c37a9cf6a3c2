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
* ``done`` / ``failed`` / ``cancelled`` / ``lost``: finished; ``result`` or ``error`` (messages are
  ours and carry no private text). A running warm-up can be cancelled too: the request is recorded
  (``cancel_requested``) and the generator stops before its next token (it polls the record). A
  warm-up is ``lost`` when the process running it died (:mod:`proxy.serving.warmup_owner`: at once
  when that is certain, on restart or on this host, else after :data:`STALE_AFTER` without a
  heartbeat). A cancelled or lost warm-up that was charged keeps its charge (it may have read
  rows); its view says so (``note``).

The body of every executor is :class:`proxy.serving.warmup_executor.WarmupExecutor`.
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

from proxy.task_config import TaskConfig
from proxy.errors import APIError
from proxy.logs import log_event
from proxy.serving.warmup import Prepared, Warmup
from proxy.serving.warmup_owner import Owner, owner_dead, previous_incarnation
from proxy.store.base import NotFound, Store

QUEUED, RUNNING, DONE, FAILED, CANCELLED, LOST = "queued", "running", "done", "failed", "cancelled", "lost"
FINISHED = (DONE, FAILED, CANCELLED, LOST)
#: A queued (in-process) or running warm-up whose heartbeat is older than this is settled on read
#: (adopted when queued and this process runs warm-ups itself, else marked lost).
STALE_AFTER = 90.0
#: How many recent warm-ups a starting process scans for ones its previous incarnation held.
RECOVER_SCAN = 1000
#: What a charged warm-up that did not finish says about its cost.
SPENT_NOTE = "its epsilon cost stays spent: it may have read rows before it stopped"


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
        # Clustered sets: the clusters used with their DP sizes (each demonstration names its cluster).
        **({"clusters": payload["clusters"]} if "clusters" in payload else {}),
        # The prompt width used and, for ``auto``, the DP share of units it fits (admin view).
        "prompt_width": payload.get("prompt_width"),
    }
    for k in ("epsilon_cost", "spent_epsilon", "remaining_epsilon", "timings"):
        if k in result:
            out[k] = result[k]
    return out


def charge_note(rec: dict[str, Any]) -> str | None:
    """What happened to the cost of a warm-up that did not finish (None otherwise)."""
    state = rec.get("state")
    if state not in (FAILED, CANCELLED, LOST):
        return None
    if rec.get("charged"):
        return SPENT_NOTE
    if state == LOST and rec.get("started_at") is not None:
        # It died while running: a reservation it made just before dying may not be on the record.
        return "any epsilon it reserved before it was lost stays spent (see the dataset's ledger)"
    return "nothing was charged"


def lost_error(rec: dict[str, Any], why: str) -> dict[str, Any]:
    """The stored error of a lost warm-up: why, and what happened to its cost."""
    note = charge_note({**rec, "state": LOST})
    return {"message": f"{why}; {note}", "type": "server_error", "code": "warmup_lost", "status": 500}


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
        "cancel_requested": bool(rec.get("cancel_requested")), "owner": rec.get("owner"),
        "note": charge_note(rec),
    }


class WarmupService:
    """Creating, listing, waiting for and cancelling warm-ups (the API side; async)."""

    def __init__(self, store: Store, warmup: Warmup, runner: Any, owner: Owner | None = None):
        self.store = store
        self.warmup = warmup
        self.runner = runner
        self.owner = owner or Owner.current("server")

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
            # A queue held in this process's memory: this process owns the queued record.
            **(self.owner.fields() if self.runner.kind == "inprocess" else {}),
        }
        rec, created = self.store.create_warmup(record, dedupe=prep.key)
        if not created and self._reap(rec)["state"] in FINISHED:
            # The active warm-up we would join belonged to a process that died: never hand out its id.
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
        """Settle a warm-up whose process died: a queued in-process one is adopted by this process
        (nothing was charged: it runs here), a running one is marked lost. Dead means certainly
        dead (:func:`proxy.serving.warmup_owner.owner_dead`) or silent for :data:`STALE_AFTER`."""
        state = rec.get("state")
        in_memory_queue = state == QUEUED and rec.get("runner") == "inprocess"
        if state != RUNNING and not in_memory_queue:
            return rec  # finished, or queued on Redis (waits there for a worker)
        stale = time.time() - float(rec.get("heartbeat_at") or 0) > STALE_AFTER
        if not stale and not owner_dead(rec, self.owner):
            return rec
        if in_memory_queue and self.runner is not None and self.runner.kind == "inprocess":
            return self._adopt(rec) or self.store.get_warmup(rec["id"]) or rec
        why = "the process running the warm-up died" if state == RUNNING else \
            "the process holding the queued warm-up died"
        new = self.store.update_warmup(rec["id"], expect=(state,), state=LOST, finished_at=time.time(),
                                       error=lost_error(rec, why))
        if new is not None:
            log_event("warmup.lost", warmup_id=rec["id"], task=rec.get("task"), was=state)
        return new or self.store.get_warmup(rec["id"]) or rec

    def _adopt(self, rec: dict[str, Any]) -> dict[str, Any] | None:
        """Take over a queued in-process warm-up (compare-and-set) and queue it here."""
        new = self.store.update_warmup(rec["id"], expect=(QUEUED,), heartbeat_at=time.time(), **self.owner.fields())
        if new is not None:
            try:
                self.runner.submit(rec["id"])
            except Exception as exc:  # noqa: BLE001 - shutting down: the next incarnation adopts it
                log_event("warmup.requeue_failed", warmup_id=rec["id"], error=type(exc).__name__)
                return new
            log_event("warmup.requeued", warmup_id=rec["id"], task=rec.get("task"))
        return new

    def recover(self) -> dict[str, int]:
        """At start-up: settle at once the warm-ups an earlier process under our name held (and any
        whose process certainly died): queued ones run here, running ones are lost."""
        return recover_warmups(self.store, self.owner,
                               self._adopt if self.runner is not None and self.runner.kind == "inprocess" else None)

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

    def cancel(self, wid: str) -> tuple[dict[str, Any], bool]:
        """Cancel a warm-up; returns ``(record, at_once)``. A queued one is cancelled at once (nothing
        was charged); a running one is asked to stop (``cancel_requested``): its generator stops
        before its next token and its charge stays. 409 once it is finished."""
        rec = self.get(wid)
        new = self.store.update_warmup(wid, expect=(QUEUED,), state=CANCELLED, finished_at=time.time())
        if new is not None:
            log_event("warmup.cancelled", warmup_id=wid, task=new.get("task"))
            return new, True
        new = self.store.update_warmup(wid, expect=(RUNNING,), cancel_requested=True, cancel_requested_at=time.time())
        if new is not None:
            log_event("warmup.cancel_requested", warmup_id=wid, task=new.get("task"))
            return new, False
        current = self.store.get_warmup(wid) or rec
        raise APIError(409, f"warm-up {wid} is {current.get('state')}; only queued or running warm-ups can be "
                            f"cancelled", "warmup_finished")


def recover_warmups(store: Store, owner: Owner, adopt: Callable[[dict[str, Any]], Any] | None) -> dict[str, int]:
    """Settle the active warm-ups of our previous incarnation (and of certainly dead processes):
    running ones are marked lost, queued in-process ones are given to ``adopt`` (or left to a
    server when None). Returns how many of each; RQ-queued ones wait on Redis, untouched."""
    counts = {"lost": 0, "requeued": 0}
    for rec in store.list_warmups(RECOVER_SCAN):
        state = rec.get("state")
        if state not in (QUEUED, RUNNING) or not (previous_incarnation(rec, owner) or owner_dead(rec, owner)):
            continue
        if state == QUEUED:
            if rec.get("runner") == "inprocess" and adopt is not None and adopt(rec) is not None:
                counts["requeued"] += 1
            continue
        err = lost_error(rec, "the process running the warm-up died (its instance restarted)")
        if store.update_warmup(rec["id"], expect=(RUNNING,), state=LOST, finished_at=time.time(), error=err):
            counts["lost"] += 1
            log_event("warmup.lost", warmup_id=rec["id"], task=rec.get("task"), was=RUNNING)
    if counts["lost"] or counts["requeued"]:
        log_event("warmup.recovered", owner=owner.name, **counts)
    return counts


def raise_failure(rec: dict[str, Any]) -> None:
    """Raise the recorded error of a failed warm-up as the APIError it was (for ``wait``)."""
    err = rec.get("error") or {}
    if rec.get("state") == FAILED:
        raise APIError(int(err.get("status") or 500), str(err.get("message") or "the warm-up failed"),
                       err.get("code") or "warmup_failed", err.get("type"))
    if rec.get("state") == LOST:
        raise APIError(500, str(err.get("message") or f"warm-up {rec['id']} was lost"), "warmup_lost", "server_error")
    if rec.get("state") == CANCELLED:
        raise APIError(409, f"warm-up {rec['id']} was cancelled", "warmup_cancelled")


def _fmt(x: Any) -> str:
    return f"{x:.2f}" if isinstance(x, (int, float)) and math.isfinite(x) else "infinity"

