"""Tasks and their DP demonstration sets: warm-up (charged generation), cache and injection.

Privacy order of a warm-up (:meth:`DemoService.warm`), all before any private row is read:
1. resolve the dataset (metadata only) and fix the DP pool-size estimates (charged once, by
   :meth:`proxy.budget.BudgetService.noisy_counts`);
2. plan the demonstrations from public quantities (:func:`aggregation.fewshot.plan_demonstrations`);
3. reserve the plan's charges in the ledger (atomic; refused with 402 when over budget).
Only then are the rows loaded and the demonstrations generated with CSPRNG noise (``Noise(None)``).

Serving from the cache is post-processing and free. The hot path (:meth:`DemoService.for_request`)
serves from process memory and re-reads the store at most every ``cache_recheck_seconds`` so
replicas notice sets deleted or created elsewhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import anyio
import dp_accounting as dpa

from aggregation.accounting import WHOLE_DATASET
from aggregation.fewshot import COUNT_SIGMA, GenerationConfig, Plan, generate_demonstration, plan_demonstrations, pools_by_label
from aggregation.mechanisms import Noise
from aggregation.prompts import Example, TaskPrompt
from aggregation.sources.base import NextTokenSource
from proxy.auth import Principal
from proxy.budget import BudgetService
from proxy.config import LOCAL_ALIASES, LOCAL_MODEL_NAME, Config, TaskConfig
from proxy.errors import APIError
from proxy.logs import log_event
from proxy.metrics import Metrics
from proxy.store.base import BudgetExceeded, DatasetMeta, NotFound, Store

#: Cached payload format version (bump when the payload layout changes).
PAYLOAD_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Tasks


class TaskRegistry:
    """Tasks from the config file (read-only) plus tasks created through the admin API (store).

    Admin tasks are re-read from the store at most every ``recheck`` seconds so that replicas see
    tasks created or deleted elsewhere.
    """

    def __init__(self, config: Config, store: Store, recheck: float):
        self.config = config
        self.store = store
        self.recheck = recheck
        self.static: dict[str, TaskConfig] = {t.name: t for t in config.tasks}
        self._admin: dict[str, TaskConfig] = {}
        self._loaded_at = -math.inf

    def _load_sync(self) -> dict[str, TaskConfig]:
        out: dict[str, TaskConfig] = {}
        for name, spec in self.store.list_tasks().items():
            try:
                out[name] = TaskConfig.model_validate(spec)
            except ValueError:
                continue  # a spec written by a newer version: skip rather than fail every request
        return out

    async def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._loaded_at >= self.recheck:
            self._admin = await anyio.to_thread.run_sync(self._load_sync)
            self._loaded_at = time.monotonic()

    async def get(self, name: str) -> TaskConfig | None:
        """The task called ``name`` (None if there is none)."""
        task = self.static.get(name)
        if task is not None:
            return task
        await self.refresh()
        return self._admin.get(name)

    async def all(self) -> dict[str, TaskConfig]:
        await self.refresh()
        return {**self._admin, **self.static}

    def is_static(self, name: str) -> bool:
        return name in self.static

    async def put(self, task: TaskConfig) -> None:
        await anyio.to_thread.run_sync(self.store.put_task, task.name, task.model_dump(mode="json"))
        self._admin[task.name] = task

    async def delete(self, name: str) -> bool:
        removed = await anyio.to_thread.run_sync(self.store.delete_task, name)
        self._admin.pop(name, None)
        return bool(removed)


# ---------------------------------------------------------------------------------------------
# Demonstration sets


def task_prompt(task: TaskConfig) -> TaskPrompt:
    """The prompt formats of a task."""
    return TaskPrompt(task.instruction, task.input_prefix, task.label_prefix,
                      tuple(sorted(task.label_words.items())))


def generation_config(task: TaskConfig) -> GenerationConfig:
    g = task.generation
    return GenerationConfig(mode=g.mode, mechanism=g.mechanism, num_subsets=g.num_subsets,
                            shots_per_subset=g.shots_per_subset, max_tokens=g.max_tokens, top_k=g.top_k,
                            epsilon=task.epsilon, sigma=g.sigma, public_only=g.public_only,
                            max_prompt_tokens=g.max_prompt_tokens)


def task_labels(task: TaskConfig, meta: DatasetMeta) -> list[str]:
    """The labels a task generates demonstrations for (400 if the dataset lacks one)."""
    if task.labels is None:
        return list(meta.labels)
    missing = [lab for lab in task.labels if lab not in meta.labels]
    if missing:
        raise APIError(400, f"task {task.name!r}: labels {missing} are not labels of dataset {meta.id}",
                       "unknown_label")
    return list(task.labels)


def cache_key(task: TaskConfig, meta: DatasetMeta, generator_id: str) -> str:
    """sha256 of (dataset id, dataset version, template hash, generation parameters, seed)."""
    material = {
        "dataset_id": meta.id,
        "dataset_version": meta.version,
        "template": task.template_hash(),
        "generation": task.generation.model_dump(mode="json"),
        "epsilon": repr(float(task.epsilon)),
        "shots": task.shots,
        "labels": task_labels(task, meta),
        "generator": generator_id,
        "seed": task.seed,
        "v": PAYLOAD_VERSION,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


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


@dataclass
class _Prepared:
    meta: DatasetMeta
    labels: list[str]
    key: str


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
    """Warm-up, caching and injection of DP demonstration sets."""

    def __init__(self, config: Config, store: Store, budget: BudgetService, metrics: Metrics,
                 tasks: TaskRegistry, local_source: Callable[[], NextTokenSource] | None = None):
        self.config = config
        self.store = store
        self.budget = budget
        self.metrics = metrics
        self.tasks = tasks
        self.recheck = config.server.cache_recheck_seconds
        self._local_source_factory = local_source
        self._sources: dict[str, NextTokenSource] = {}
        self._sources_lock = threading.Lock()
        #: Generation is CPU-heavy: one at a time per process.
        self._gen_lock = threading.Lock()
        self._key_locks: dict[str, asyncio.Lock] = {}
        self._mem: dict[str, _MemEntry] = {}

    # -- generator sources ------------------------------------------------------------------
    def generator_id(self, task: TaskConfig) -> str:
        """Identity of the generator model (part of the cache key)."""
        gen = task.generator
        if gen is None or gen in LOCAL_ALIASES:
            return "local:" + (self.config.server.local_model or LOCAL_MODEL_NAME)
        entry = self.config.model_entry(gen)
        params = entry.litellm_params if entry is not None else {}
        return f"openai:{params.get('model')}@{params.get('api_base')}:{task.generation.top_logprobs}"

    def _source(self, task: TaskConfig) -> NextTokenSource:
        """The generator's next-token source, loaded lazily once per process."""
        gid = self.generator_id(task)
        with self._sources_lock:
            src = self._sources.get(gid)
            if src is not None:
                return src
            if gid.startswith("local:"):
                if self._local_source_factory is not None:
                    src = self._local_source_factory()
                else:
                    from aggregation.sources.local import LocalSource

                    src = LocalSource.from_pretrained(self.config.server.local_model)
            else:
                src = self._openai_source(task)
            self._sources[gid] = src
            return src

    def _openai_source(self, task: TaskConfig) -> NextTokenSource:
        import os

        from aggregation.sources.openai_compat import OpenAICompatSource

        entry = self.config.model_entry(task.generator or "")
        if entry is None:
            raise APIError(400, f"task {task.name!r}: generator {task.generator!r} is not in model_list",
                           "unknown_generator")
        params = entry.litellm_params
        key_ref = params.get("api_key")
        api_key = None
        if isinstance(key_ref, str) and key_ref.startswith("os.environ/"):
            api_key = os.environ.get(key_ref.split("/", 1)[1])
        return OpenAICompatSource(
            params["model"], params.get("api_base"), api_key,
            top_logprobs=task.generation.top_logprobs,
            retries=self.config.server.retries, timeout=self.config.server.timeout,
        )

    def close(self) -> None:
        for src in self._sources.values():
            close = getattr(src, "close", None)
            if callable(close):
                close()

    # -- resolution ---------------------------------------------------------------------------
    def resolve_dataset(self, ref: str) -> DatasetMeta:
        """Dataset by id, else the newest version with that name (409 if there is none)."""
        try:
            return self.store.resolve_dataset(ref)
        except NotFound:
            raise APIError(409, f"dataset {ref!r} is not uploaded (POST /admin/datasets)", "dataset_missing") from None

    def _prepare(self, task: TaskConfig) -> _Prepared:
        meta = self.resolve_dataset(task.dataset)
        labels = task_labels(task, meta)
        return _Prepared(meta, labels, cache_key(task, meta, self.generator_id(task)))

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

    def forget(self, task: str | None = None, dataset_id: str | None = None) -> None:
        """Drop in-memory entries (by task name or dataset id)."""
        for name, entry in list(self._mem.items()):
            if (task is not None and name == task) or (dataset_id is not None and entry.dataset_id == dataset_id):
                self._mem.pop(name, None)

    # -- hot path -------------------------------------------------------------------------------
    async def for_request(self, task: TaskConfig, principal: Principal) -> ServedDemos:
        """The task's cached set for a client request (generates it when the task allows)."""
        entry = self._mem.get(task.name)
        if entry is None or entry.task is not task or time.monotonic() - entry.checked_at >= self.recheck:
            try:
                key, dataset_id, payload = await anyio.to_thread.run_sync(self._lookup_sync, task)
            except APIError as exc:
                # Clients never see datasets or budgets: a generic message, details for the admin.
                raise self._client_error(task, exc, principal) from None
            entry = self._remember(task, key, dataset_id, payload)
        if entry.demos is not None:
            self.metrics.demo_cache.labels(task.name, "hit").inc()
            return entry.demos
        self.metrics.demo_cache.labels(task.name, "miss").inc()
        if task.on_missing == "error":
            raise APIError(409, f"demonstrations for task {task.name} are not cached; an admin must warm them "
                                f"up: POST /admin/tasks/{task.name}/demos", "demos_not_cached")
        try:
            result = await self.warm(task, principal.actor, dry_run=False, admin=principal.kind == "admin")
        except APIError as exc:
            raise self._client_error(task, exc, principal) from None
        entry = self._mem.get(task.name)
        if entry is not None and entry.demos is not None and entry.key == result["key"]:
            return entry.demos
        return self._served(task, result["key"], result["payload"])

    @staticmethod
    def _client_error(task: TaskConfig, exc: APIError, principal: Principal) -> APIError:
        if principal.kind == "admin":
            return exc
        if exc.status == 402:
            return APIError(402, f"demonstrations for task {task.name} are not cached and the privacy budget "
                                 f"does not allow generating them; an admin must raise the budget or warm "
                                 f"them up: POST /admin/tasks/{task.name}/demos", "budget_exceeded")
        return APIError(409, f"demonstrations for task {task.name} are not available; an admin must warm them "
                             f"up: POST /admin/tasks/{task.name}/demos", "demos_not_cached")

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

    # -- warm-up -------------------------------------------------------------------------------
    async def warm(self, task: TaskConfig, actor: str, dry_run: bool = False, admin: bool = True) -> dict[str, Any]:
        """Generate (or, with ``dry_run``, price) the task's demonstration set.

        Returns ``{"key", "cached", "payload", ...}``; a set already cached under the current key is
        returned without charging anything. Raises APIError 402 (budget), 409 (dataset missing) or
        400 (bad task parameters). ``admin`` says whether the caller may learn the dataset's row
        count (see :meth:`_warm_sync`).
        """
        prep = await anyio.to_thread.run_sync(self._prepare, task)
        if dry_run:
            return await anyio.to_thread.run_sync(self._price_sync, task, prep, actor)
        lock = self._key_locks.setdefault(prep.key, asyncio.Lock())
        async with lock:  # a concurrent warm-up of the same key waits, then reads the cache
            payload = await anyio.to_thread.run_sync(self.store.get_demos, prep.key)
            if payload is not None:
                self._remember(task, prep.key, prep.meta.id, payload)
                return {"key": prep.key, "cached": True, "charged": False, "payload": payload}
            try:
                result = await anyio.to_thread.run_sync(self._warm_sync, task, prep, actor, admin)
            except APIError:
                self.metrics.demo_generations.labels(task.name, "refused").inc()
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a clean error below
                self.metrics.demo_generations.labels(task.name, "failed").inc()
                raise _generation_error(exc) from None
            self.metrics.demo_generations.labels(task.name, "generated").inc()
            self._remember(task, prep.key, prep.meta.id, result["payload"])
            return result

    def _plan(self, task: TaskConfig, meta: DatasetMeta, labels: list[str],
              pool_sizes: dict[str, float]) -> Plan:
        config = generation_config(task)
        if not config.private and not config.public_only and not meta.public:
            raise APIError(400, f"task {task.name!r} has infinite epsilon (no noise), which is only allowed on "
                                f"datasets marked public", "not_private")
        try:
            return plan_demonstrations(config, {lab: task.shots for lab in labels}, pool_sizes,
                                       meta.budget_delta)
        except ValueError as exc:
            # Messages name labels and DP-estimated sizes only (admin-facing).
            raise APIError(400, f"task {task.name!r}: {exc}", "invalid_generation") from None

    def _estimated_pools(self, meta: DatasetMeta, labels: list[str]) -> dict[str, float]:
        """Pool sizes for pricing before the DP counts exist: rows spread evenly over labels."""
        share = meta.rows / max(1, len(meta.labels))
        return {lab: share for lab in labels}

    def _price_sync(self, task: TaskConfig, prep: _Prepared, actor: str) -> dict[str, Any]:
        meta, labels = prep.meta, prep.labels
        cached = self.store.get_demos(prep.key) is not None
        counts_pending = meta.noisy_counts is None and not task.generation.public_only
        pools = dict(meta.noisy_counts or {}) if not counts_pending else self._estimated_pools(meta, labels)
        plan = self._plan(task, meta, labels, pools)
        charges = list(plan.charges())
        if counts_pending:
            charges.insert(0, (WHOLE_DATASET, dpa.GaussianDpEvent(COUNT_SIGMA)))
        res = self.budget.reserve(meta.id, charges, actor, f"dry run: task {task.name}", dry_run=True)
        return {
            "key": prep.key, "dry_run": True, "cached": cached, "dataset_id": meta.id,
            "epsilon_cost": _num(res.epsilon), "set_epsilon": _num(plan.epsilon()),
            "spent_epsilon": _num(res.spent_before), "remaining_epsilon": _num(max(0.0, res.budget_epsilon - res.spent_before)),
            "remaining_after": _num(res.remaining), "budget_epsilon": res.budget_epsilon,
            "budget_delta": res.budget_delta, "fits": res.fits,
            # Before the first real warm-up the per-label pool sizes are estimated (the DP counts,
            # charged once, are released then), so the cost is approximate.
            "estimate": counts_pending,
        }

    def _refuse(self, exc: BudgetExceeded) -> APIError:
        return APIError(402, f"privacy budget exceeded: {exc}", "budget_exceeded")

    def _warm_sync(self, task: TaskConfig, prep: _Prepared, actor: str, admin: bool = True) -> dict[str, Any]:
        meta, labels = prep.meta, prep.labels
        reason = f"task {task.name} demos {prep.key[:12]}"
        config = generation_config(task)
        try:
            if config.public_only:
                pools: dict[str, float] = {}
            else:
                if meta.noisy_counts is None:
                    # Refuse hopeless requests before the one-time count release is charged. The
                    # estimate uses the exact row count, which the admin already knows (upload
                    # answer) but a client must not learn from a refusal: for clients only the
                    # count release itself, a data-independent cost, is checked first.
                    trial = [(WHOLE_DATASET, dpa.GaussianDpEvent(COUNT_SIGMA))]
                    if admin:
                        estimate = self._plan(task, meta, labels, self._estimated_pools(meta, labels))
                        trial += list(estimate.charges())
                    res = self.budget.reserve(meta.id, trial, actor, reason, dry_run=True)
                    if not res.fits:
                        raise BudgetExceeded(
                            f"this request needs about epsilon {_fmt(res.epsilon)} but only "
                            f"{_fmt(max(0.0, res.budget_epsilon - res.spent_before))} of "
                            f"{_fmt(res.budget_epsilon)} remains on dataset {meta.id}",
                            remaining=max(0.0, res.budget_epsilon - res.spent_before))
                pools = self.budget.noisy_counts(meta.id, actor, f"noisy pool sizes for task {task.name}")
            plan = self._plan(task, meta, labels, pools)
            # The spend is recorded BEFORE any private row is read.
            res = self.budget.reserve(meta.id, plan.charges(), actor, reason)
        except BudgetExceeded as exc:
            raise self._refuse(exc) from None
        except NotFound:
            raise APIError(409, f"dataset {task.dataset!r} was deleted", "dataset_missing") from None
        self.metrics.record_spend(meta.id, res.spent_after, res.budget_epsilon)
        log_event("demos.reserved", task=task.name, dataset_id=meta.id, epsilon=_num(res.epsilon),
                  spent=_num(res.spent_after), actor=actor)
        source = self._source(task)
        prompt = task_prompt(task)
        noise = Noise(None)  # CSPRNG: the noise must not be reproducible from the seed
        started = time.perf_counter()
        with self._gen_lock:
            if config.public_only:
                pools_rows: dict[str, list[Example]] = {}
            else:
                try:
                    rows = self.store.load_rows(meta.id)
                except NotFound:
                    raise APIError(409, f"dataset {meta.id} was deleted during the warm-up (its charge "
                                        f"stays in the ledger)", "dataset_missing") from None
                pools_rows = pools_by_label([Example(t, lab) for t, lab in rows])
                del rows
            demos: list[dict[str, Any]] = []
            tokens = 0
            for label in labels:
                for _ in range(task.shots):
                    d = generate_demonstration(source, prompt, pools_rows.get(label, []), label, config,
                                               plan.labels[label], noise)
                    demos.append({"text": d.text, "label": label})
                    tokens += d.tokens
            del pools_rows
        payload = {
            "version": PAYLOAD_VERSION,
            "task": task.name,
            "dataset_id": meta.id,
            "dataset_version": meta.version,
            "labels": labels,
            "demos": demos,
            "epsilon": _num(plan.epsilon()),
            "delta": meta.budget_delta,
            "generator": self.generator_id(task),
            "created_at": time.time(),
            "tokens": tokens,
            "seconds": round(time.perf_counter() - started, 3),
        }
        self.store.put_demos(prep.key, meta.id, task.name, payload)
        log_event("demos.generated", task=task.name, dataset_id=meta.id, demos=len(demos), tokens=tokens,
                  seconds=payload["seconds"])
        return {"key": prep.key, "cached": False, "charged": True, "payload": payload,
                "epsilon_cost": _num(res.epsilon), "spent_epsilon": _num(res.spent_after),
                "remaining_epsilon": _num(max(0.0, res.remaining))}


# ---------------------------------------------------------------------------------------------
# Injection


def inject_chat(messages: list[Any], prefix: str) -> list[Any]:
    """Messages with the demonstrations as (or prepended to) the first system message."""
    out = list(messages)
    if out and isinstance(out[0], dict) and out[0].get("role") in ("system", "developer"):
        first = dict(out[0])
        content = first.get("content")
        if isinstance(content, str):
            first["content"] = prefix + content
        elif isinstance(content, list):
            first["content"] = [{"type": "text", "text": prefix}, *content]
        else:
            first["content"] = prefix.rstrip()
        out[0] = first
    else:
        out.insert(0, {"role": "system", "content": prefix.rstrip()})
    return out


def check_completion_prompt(prompt: Any) -> None:
    """400 unless ``prompt`` is a string or a non-empty list of strings (text can be prefixed)."""
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return
    raise APIError(400, "task models accept a string prompt or a list of strings (not token arrays)",
                   "invalid_prompt", param="prompt")


def inject_completion(prompt: Any, prefix: str) -> Any:
    """A completion prompt (string or list of strings) with the demonstrations as a prefix."""
    check_completion_prompt(prompt)
    if isinstance(prompt, str):
        return prefix + prompt
    return [prefix + p for p in prompt]


def _num(x: float) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _generation_error(exc: Exception) -> APIError:
    """A clean error for a failed generation. Only messages written to be safe are passed on (the
    upstream / source errors and missing-model errors); anything else is named by type only, as
    its text could quote a prompt, and prompts hold private rows."""
    from proxy.upstreams import UpstreamError

    note = "any budget reserved for it stays spent"
    if isinstance(exc, UpstreamError):
        return APIError(502, f"the generator model failed: {exc.message}; {note}", "generator_error")
    if type(exc).__name__ == "SourceError":  # aggregation.sources.openai_compat: type + status only
        return APIError(502, f"the generator model failed: {exc}; {note}", "generator_error")
    if isinstance(exc, FileNotFoundError):
        return APIError(503, f"the generator model is not available: {exc}; {note}", "generator_unavailable")
    return APIError(500, f"demonstration generation failed ({type(exc).__name__}); {note}", "generation_failed")


def _fmt(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else "infinity"
