"""Demonstration sets of tasks: cache keys, the serving hot path and the admin's cache operations.

Generation (charged, in the privacy order) is :mod:`proxy.serving.warmup`; this module decides
when it runs. Serving from the cache is post-processing and free. The hot path
(:meth:`DemoService.for_request`) serves from process memory and re-reads the store at most every
``cache_recheck_seconds`` so replicas notice sets deleted or created elsewhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

import anyio

from aggregation.embeddings import MiniLMEmbedder
from aggregation.prompts import Example
from aggregation.sources.base import NextTokenSource
from proxy.auth import Principal
from proxy.budget import BudgetService
from proxy.config import Config
from proxy.task_config import TaskConfig
from proxy.errors import APIError
from proxy.metrics import Metrics
from proxy.serving.generators import Generators
from proxy.serving.tasks import TaskRegistry, task_labels, task_prompt
from proxy.serving.warmup import PAYLOAD_VERSION, Prepared, Warmup
from proxy.serving.warmup_runners import RQWarmupRunner, ThreadRunner
from proxy.serving.warmup_executor import WarmupExecutor
from proxy.serving.warmup_owner import Owner
from proxy.serving.warmups import DONE, WarmupService, raise_failure
from proxy.store.base import DatasetMeta, NotFound, Store

#: Retry-After (seconds) told to a client whose task's set is being generated. A constant: the
#: real remaining time depends on when generation stops, which depends on the data.
CLIENT_RETRY_AFTER = 30
#: After a failed warm-up, client requests do not start another one for this long (seconds).
CLIENT_RETRY_FAILED_AFTER = 60.0


def cache_key(task: TaskConfig, meta: DatasetMeta, generator_id: str) -> str:
    """sha256 of (dataset id, dataset version, template hash, generation parameters, revision).

    Every input is public: ids and versions, task configuration and the declared label domain
    (:func:`task_labels`), never anything read from the rows. The revision is stored under its
    old name "seed" so existing cache keys stay valid."""
    material = {
        "dataset_id": meta.id,
        "dataset_version": meta.version,
        "template": task.template_hash(),
        "generation": _generation_key(task),
        "epsilon": repr(float(task.epsilon)),
        "shots": task.shots,
        "labels": task_labels(task, meta),
        "generator": generator_id,
        "seed": task.revision,
        "v": PAYLOAD_VERSION,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _generation_key(task: TaskConfig) -> dict[str, Any]:
    """The generation settings in the cache key; clustering only when it is on, guidance only
    when it is not 1 and private_tokens only when set, so that tasks written before any of them
    existed keep their cache keys (and their cached sets)."""
    gen = task.generation.model_dump(mode="json")
    if gen.get("guidance") == 1.0:
        gen.pop("guidance")
    if gen.get("private_tokens") is None:
        gen.pop("private_tokens", None)
    if not gen.get("clusters"):
        gen.pop("clusters", None)
        gen.pop("clustering", None)
    return gen


@dataclass
class ServedDemos:
    """A cached set ready for injection."""

    key: str
    payload: dict[str, Any]
    prefix: str  # instruction + demonstrations in serving format


@dataclass
class _MemEntry:
    task: TaskConfig  # the spec the entry was built for (a replaced spec invalidates it)
    key: str | None
    dataset_id: str | None
    demos: ServedDemos | None
    checked_at: float


def _interleave(demos: Sequence[dict[str, Any]], labels: Sequence[str]) -> list[Example]:
    """Round-robin over labels (a, b, c, a, b, c, ...) so no label sits only at the end."""
    by_label: dict[str, list[Example]] = {lab: [] for lab in labels}
    for d in demos:
        by_label.setdefault(d["label"], []).append(Example(d["text"], d["label"]))
    out: list[Example] = []
    rounds = max((len(v) for v in by_label.values()), default=0)
    for i in range(rounds):
        for lab in by_label:
            if i < len(by_label[lab]):
                out.append(by_label[lab][i])
    return out


class DemoService:
    """Caching and serving of DP demonstration sets; warm-ups go through :class:`Warmup`."""

    def __init__(self, config: Config, store: Store, budget: BudgetService, metrics: Metrics,
                 tasks: TaskRegistry, local_source: Callable[[], NextTokenSource] | None = None):
        self.config = config
        self.store = store
        self.budget = budget
        self.metrics = metrics
        self.tasks = tasks
        self.recheck = config.server.cache_recheck_seconds
        self.generators = Generators(config, local_source)
        # The clustered tasks' embedder: one per service (process), its model loaded on first use.
        self.warmup = Warmup(store, budget, metrics, self.generators, MiniLMEmbedder())
        jobs = config.jobs
        runner: ThreadRunner | RQWarmupRunner
        owner = Owner.current("server")  # this process, as the holder of in-process warm-ups
        if jobs.queue_url:
            runner = RQWarmupRunner(jobs.queue_url, jobs.queue_name)
        else:
            runner = ThreadRunner(store, WarmupExecutor(store, self.warmup, metrics, owner=owner).run)
        self.warmups = WarmupService(store, self.warmup, runner, owner=owner)
        self._mem: dict[str, _MemEntry] = {}
        #: One store lookup in flight per task, shared by every request that needs it.
        self._lookups: dict[str, asyncio.Future] = {}
        self._client_warmups: dict[str, str] = {}  # cache key -> last warm-up a client request started

    def close(self) -> None:
        self.warmups.close()
        self.generators.close()

    # -- resolution ---------------------------------------------------------------------------
    def resolve_dataset(self, ref: str) -> DatasetMeta:
        """Dataset by id, else the newest version with that name (409 if there is none)."""
        try:
            return self.store.resolve_dataset(ref)
        except NotFound:
            raise APIError(409, f"dataset {ref!r} is not uploaded (upload it with dpicl datasets upload, "
                                f"POST /admin/datasets)", "dataset_missing") from None

    def _prepare(self, task: TaskConfig) -> Prepared:
        meta = self.resolve_dataset(task.dataset)
        labels = task_labels(task, meta)
        return Prepared(meta, labels, cache_key(task, meta, self.generators.generator_id(task)))

    def _served(self, task: TaskConfig, key: str, payload: dict[str, Any]) -> ServedDemos:
        demos = _interleave(payload.get("demos", []), payload.get("labels") or [])
        return ServedDemos(key, payload, task_prompt(task).serving_prefix(demos))

    def _remember(self, task: TaskConfig, key: str | None, dataset_id: str | None,
                  payload: dict[str, Any] | None) -> _MemEntry:
        served = self._served(task, key, payload) if (key and payload) else None
        entry = _MemEntry(task, key, dataset_id, served, time.monotonic())
        self._mem[task.name] = entry
        return entry

    def _lookup_sync(self, task: TaskConfig) -> tuple[str, str, dict[str, Any] | None]:
        prep = self._prepare(task)
        return prep.key, prep.meta.id, self.store.get_demos(prep.key)

    def _lookup_once(self, task: TaskConfig) -> asyncio.Future:
        """The task's store lookup, started once and shared: without this, every request in flight
        when the cache entry went stale ran its own lookup (32 thread hops at 32 connections,
        every ``recheck`` seconds, which showed up in the latency tail)."""
        running = self._lookups.get(task.name)
        if running is None or running.done():
            running = asyncio.ensure_future(anyio.to_thread.run_sync(self._lookup_sync, task))
            self._lookups[task.name] = running

            def done(fut: asyncio.Future, name: str = task.name) -> None:
                if self._lookups.get(name) is fut:
                    del self._lookups[name]
                if not fut.cancelled() and fut.exception() is None:
                    self._remember(task, *fut.result())
                else:
                    # A failed re-check (dataset gone, store down) must not leave a stale set
                    # being served: the next request looks up again and reports the error.
                    entry = self._mem.get(name)
                    if entry is not None and entry.task is task:
                        self._mem.pop(name, None)

            running.add_done_callback(done)
        return running

    def forget(self, task: str | None = None, dataset_id: str | None = None) -> None:
        """Drop in-memory entries (by task name or dataset id)."""
        for name, entry in list(self._mem.items()):
            if (task is not None and name == task) or (dataset_id is not None and entry.dataset_id == dataset_id):
                self._mem.pop(name, None)

    # -- hot path -------------------------------------------------------------------------------
    async def for_request(self, task: TaskConfig, principal: Principal) -> ServedDemos:
        """The task's cached set for a client request (generates it when the task allows)."""
        entry = self._mem.get(task.name)
        known = entry is not None and entry.task is task
        if known and entry.demos is not None and time.monotonic() - entry.checked_at >= self.recheck:
            # Serve the set in memory and re-check the store in the background (once for all
            # requests): a set deleted elsewhere is still noticed within one lookup.
            self._lookup_once(task)
        elif not known or time.monotonic() - entry.checked_at >= self.recheck:
            try:
                found = await asyncio.shield(self._lookup_once(task))
            except APIError as exc:
                # Clients never see datasets or budgets: a generic message, details for the admin.
                raise self._client_error(task, exc, principal) from None
            entry = self._mem.get(task.name) or self._remember(task, *found)
        if entry.demos is not None:
            self.metrics.demo_cache.labels(task.name, "hit").inc()
            return entry.demos
        self.metrics.demo_cache.labels(task.name, "miss").inc()
        if task.on_missing == "error":
            raise APIError(409, f"demonstrations for task {task.name} are not cached; an admin must warm them "
                                f"up: dpicl tasks warm {task.name} (POST /admin/tasks/{task.name}/demos)",
                           "demos_not_cached")
        # Never hold the connection for a generation: start one in the background (deduplicated
        # in the store) and answer 503 + Retry-After at once.
        admin = principal.kind == "admin"
        try:
            prep = await anyio.to_thread.run_sync(self._prepare, task)
            # Re-read the store: another replica (or our own warm-up) may have just stored the set.
            payload = await anyio.to_thread.run_sync(self.store.get_demos, prep.key)
            if payload is None:
                # The last warm-up this process started for the set: if it failed recently, say
                # so instead of starting the same doomed warm-up on every request.
                wid = self._client_warmups.get(prep.key)
                rec, created = await self.warmups.start(task, prep, principal.actor, admin=admin,
                                                        unless_failed=(wid, CLIENT_RETRY_FAILED_AFTER))
                if created:  # the admin audit log records warm-ups a client request started too
                    await anyio.to_thread.run_sync(lambda: self.store.append_audit(
                        principal.name, "warmup.start", task.name,
                        {"dataset": task.dataset, "warmup_id": rec["id"], "trigger": "client"}))
                self._client_warmups[prep.key] = rec["id"]
                if rec["state"] == DONE:
                    payload = await anyio.to_thread.run_sync(self.store.get_demos, prep.key)
        except APIError as exc:
            raise self._client_error(task, exc, principal) from None
        if payload is not None:
            served = self._remember(task, prep.key, prep.meta.id, payload).demos
            assert served is not None
            return served
        extra = f" (warm-up {rec['id']})" if admin else ""
        raise APIError(503, f"demonstrations for task {task.name} are being generated{extra}; retry later",
                       "demos_warming", headers={"Retry-After": str(CLIENT_RETRY_AFTER)})

    @staticmethod
    def _client_error(task: TaskConfig, exc: APIError, principal: Principal) -> APIError:
        if principal.kind == "admin":
            return exc
        if exc.status == 402:
            return APIError(402, f"demonstrations for task {task.name} are not cached and the privacy budget "
                                 f"does not allow generating them; an admin must raise the budget or warm "
                                 f"them up: dpicl tasks warm {task.name} (POST /admin/tasks/{task.name}/demos)",
                           "budget_exceeded")
        return APIError(409, f"demonstrations for task {task.name} are not available; an admin must warm them "
                             f"up: dpicl tasks warm {task.name} (POST /admin/tasks/{task.name}/demos)",
                           "demos_not_cached")

    # -- admin: cache --------------------------------------------------------------------------
    async def cached(self, task: TaskConfig) -> dict[str, Any]:
        """What is cached for a task (the current key's set, if any)."""
        key, dataset_id, payload = await anyio.to_thread.run_sync(self._lookup_sync, task)
        self._remember(task, key, dataset_id, payload)
        return {"task": task.name, "key": key, "dataset_id": dataset_id, "cached": payload is not None,
                **({"demonstrations": payload} if payload else {})}

    async def drop(self, task: TaskConfig) -> int:
        """Delete every cached set of a task (all keys); returns how many."""
        n = await anyio.to_thread.run_sync(lambda: self.store.delete_demos(task=task.name))
        self.forget(task=task.name)
        return int(n)

    async def prompt_width(self, task: TaskConfig) -> dict[str, Any] | None:
        """The task's prompt width now (admin view; charges nothing), or None without its dataset."""
        def run() -> dict[str, Any] | None:
            try:
                return self.warmup.width(task, self._prepare(task)).to_dict()
            except (APIError, NotFound):
                return None
            except (ImportError, OSError):  # no tokenizer here (missing extra or model): the warm-up says why
                return None

        return await anyio.to_thread.run_sync(run)

    # -- warm-up -------------------------------------------------------------------------------
    async def price(self, task: TaskConfig, actor: str) -> dict[str, Any]:
        """Dry run: what warming the task's set would cost now (nothing charged or read)."""
        prep = await anyio.to_thread.run_sync(self._prepare, task)
        return await anyio.to_thread.run_sync(self.warmup.price, task, prep, actor)

    async def start_warmup(self, task: TaskConfig, actor: str, admin: bool = True, wait: bool = False,
                           gone: Callable[[], Awaitable[bool]] | None = None) -> dict[str, Any]:
        """Queue the task's warm-up (or join the active one); with ``wait``, until it finishes.

        Returns the warm-up record. A set already cached gives a finished record that charged
        nothing. Raises APIError 402 (does not fit the budget now), 409 (dataset missing), 400 (bad
        task parameters); with ``wait``, the warm-up's own failure.
        """
        prep = await anyio.to_thread.run_sync(self._prepare, task)
        rec, _ = await self.warmups.start(task, prep, actor, admin=admin)
        if wait:
            rec = await self.warmups.wait(rec["id"], gone=gone)
            raise_failure(rec)
        if rec["state"] == DONE:
            payload = await anyio.to_thread.run_sync(self.store.get_demos, prep.key)
            self._remember(task, prep.key, prep.meta.id, payload)
        return rec
