"""Tasks: the registry (tasks from the config file plus tasks created through the admin API) and
what a task means to the DP generator (prompt formats, generation parameters, labels).
"""

from __future__ import annotations

import math
import time

import anyio

from aggregation.fewshot import GenerationConfig
from aggregation.prompts import TaskPrompt
from proxy.config import DEFAULT_PROMPT_TOKENS, Config, TaskConfig
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


def task_prompt(task: TaskConfig) -> TaskPrompt:
    """The prompt formats of a task."""
    return TaskPrompt(task.instruction, task.input_prefix, task.label_prefix,
                      tuple(sorted(task.label_words.items())))


def generation_config(task: TaskConfig, width: int | None = None) -> GenerationConfig:
    """The generator's configuration of ``task``; ``width`` is its resolved prompt width (see
    proxy.serving.widths), needed only to generate (plans and charges do not depend on it)."""
    g = task.generation
    if width is None:
        width = g.max_prompt_tokens if isinstance(g.max_prompt_tokens, int) else DEFAULT_PROMPT_TOKENS
    return GenerationConfig(mode=g.mode, mechanism=g.mechanism, num_subsets=g.num_subsets,
                            shots_per_subset=g.shots_per_subset, max_tokens=g.max_tokens, top_k=g.top_k,
                            epsilon=task.epsilon, sigma=g.sigma, public_only=g.public_only,
                            max_prompt_tokens=width, block_tokens=g.block_tokens,
                            clip=g.clip, temperature=g.temperature)


def task_labels(task: TaskConfig, meta: DatasetMeta) -> list[str]:
    """The labels a task generates demonstrations for (400 if the dataset lacks one)."""
    if task.labels is None:
        return list(meta.labels)
    missing = [lab for lab in task.labels if lab not in meta.labels]
    if missing:
        raise APIError(400, f"task {task.name!r}: labels {missing} are not labels of dataset {meta.id}",
                       "unknown_label")
    return list(task.labels)
