"""Tasks: the registry (tasks from the config file plus tasks created through the admin API) and
what a task means to the DP generator (prompt formats, generation parameters, labels).
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import anyio

from aggregation.fewshot import GenerationConfig
from aggregation.prompts import TaskPrompt
from proxy.config import Config
from proxy.task_config import DEFAULT_PROMPT_TOKENS, TaskConfig, stored_task
from proxy.errors import APIError
from proxy.store.base import DatasetMeta, Store


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
                out[name] = stored_task(spec)
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


def task_prompt(task: TaskConfig, domain: Sequence[str] = ()) -> TaskPrompt:
    """The prompt formats of a task; generation aliases (``generation.label_hint: alias``) are
    numbered over ``domain``, the task's public label domain (:func:`task_labels`)."""
    prompt = TaskPrompt(task.instruction, task.input_prefix, task.label_prefix,
                        tuple(sorted(task.label_words.items())))
    return prompt.with_hint(task.generation.label_hint, domain)


def generation_config(task: TaskConfig, width: int | None = None) -> GenerationConfig:
    """The generator's configuration of ``task``; ``width`` is its resolved prompt width (see
    proxy.serving.widths), needed only to generate (plans and charges do not depend on it)."""
    g = task.generation
    if width is None:
        width = g.max_prompt_tokens if isinstance(g.max_prompt_tokens, int) else DEFAULT_PROMPT_TOKENS
    return GenerationConfig(mode=g.mode, mechanism=g.mechanism, num_subsets=g.num_subsets,
                            shots_per_subset=g.shots_per_subset, max_tokens=g.max_tokens,
                            private_tokens=g.private_tokens, top_k=g.top_k,
                            epsilon=task.epsilon, sigma=g.sigma, public_only=g.public_only,
                            max_prompt_tokens=width, block_tokens=g.block_tokens,
                            clip=g.clip, temperature=g.temperature, guidance=g.guidance)


#: A task's state as the admin sees it: its dataset is uploaded and fits it, is not uploaded yet,
#: or was uploaded (or re-budgeted) so that the task cannot be warmed as it stands.
READY, WAITING, INVALID = "ready", "waiting", "invalid"


def task_problem(task: TaskConfig, meta: DatasetMeta) -> str | None:
    """Why ``task`` cannot be warmed on dataset ``meta`` (one line, admin-facing), or None.

    Checks the declared labels against the dataset's public label domain and the task's epsilon
    against the dataset's whole budget; both are public configuration, so saying so leaks nothing."""
    if task.labels is not None:
        missing = [lab for lab in task.labels if lab not in meta.labels]
        if missing:
            return f"labels {missing} are not labels of dataset {meta.name!r}"
    if task.generation.public_only:
        return None  # reads no private data and costs nothing
    if task.generation.clusters:
        from proxy.serving.clusters import embedder_problem

        problem = embedder_problem()
        if problem:
            return problem
    if math.isinf(task.epsilon):
        if not meta.public:
            return f"infinite epsilon (no noise) is only allowed on datasets marked public; {meta.name!r} is not"
    elif task.epsilon > meta.budget_epsilon:
        return (f"epsilon {task.epsilon:g} per demonstration set is above the whole budget "
                f"{meta.budget_epsilon:g} of dataset {meta.name!r}")
    return None


def task_status(task: TaskConfig, meta: DatasetMeta | None) -> tuple[str, str | None]:
    """``(status, detail)``: READY, WAITING (dataset not uploaded yet) or INVALID (with the reason)."""
    if meta is None:
        return WAITING, f"dataset {task.dataset!r} is not uploaded yet"
    problem = task_problem(task, meta)
    return (INVALID, problem) if problem else (READY, None)


def task_labels(task: TaskConfig, meta: DatasetMeta) -> list[str]:
    """The labels a task generates demonstrations for (400 if the dataset lacks one)."""
    if task.labels is None:
        return list(meta.labels)
    missing = [lab for lab in task.labels if lab not in meta.labels]
    if missing:
        raise APIError(400, f"task {task.name!r}: labels {missing} are not labels of dataset {meta.id}",
                       "unknown_label")
    return list(task.labels)
