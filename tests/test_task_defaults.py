"""A new task's generation defaults follow the README's grid (aliases, guidance 3, a private prefix
of 4 tokens); a task the service stored before those defaults keeps the settings it was stored
with, and with them its cache key and the demonstrations it paid for."""

from __future__ import annotations

import anyio
import pytest
from pydantic import ValidationError

from proxy.config import config_from_dict
from proxy.serving.demos import cache_key
from proxy.serving.tasks import TaskRegistry, generation_config
from proxy.store.base import DatasetMeta
from proxy.store.sqlite import SqliteStore
from proxy.task_config import LEGACY_GENERATION, GenerationSettings, TaskConfig, stored_task
from tests.test_app_support import legacy_cache_key

BASE = {"name": "t", "dataset": "d", "instruction": "Classify.", "label_words": {"LOC": "place", "NUM": "count"}}
META = DatasetMeta(id="ds_1", rows=3, created_at=0.0, budget_epsilon=4.0, budget_delta=1e-5, labels=["LOC", "NUM"],
                   name="d", version=1)


def _old_dump(**generation) -> dict:
    """A spec as the service stored it before the later generation settings existed."""
    spec = stored_task({**BASE, "generation": generation}).model_dump(mode="json")
    for key in LEGACY_GENERATION:
        spec["generation"].pop(key)
    return spec


def test_a_new_task_generates_with_the_grid_defaults():
    g = GenerationSettings()
    assert (g.label_hint, g.guidance, g.private_tokens, g.mode, g.mechanism) == ("alias", 3.0, 4, "fixed",
                                                                                    "public_prior")
    config = generation_config(TaskConfig(**BASE))
    assert (config.guidance, config.private_tokens, config.private_steps) == (3.0, 4, 4)


def test_defaults_that_depend_on_other_fields():
    gaussian = GenerationSettings(sigma=1.0)  # sigma without a mechanism means Gaussian, which takes no guidance
    assert (gaussian.mechanism, gaussian.guidance, gaussian.private_tokens) == ("gaussian", 1.0, 4)
    assert GenerationSettings(mechanism="exponential").guidance == 1.0
    public = GenerationSettings(public_only=True)  # no private rows: no prefix, and words, which mean something
    assert (public.private_tokens, public.label_hint) == (None, "word")
    every = GenerationSettings(private_tokens=None)  # an explicit null keeps every token private
    assert every.private_tokens is None and generation_config(TaskConfig(**BASE, generation=every)).private_steps == 30
    explicit = GenerationSettings(label_hint="word", guidance=1.0, private_tokens=6)
    assert (explicit.label_hint, explicit.guidance, explicit.private_tokens) == ("word", 1.0, 6)
    with pytest.raises(ValidationError, match="public_prior mechanism only"):
        GenerationSettings(mechanism="gaussian", guidance=3.0)
    with pytest.raises(ValidationError, match="public_only"):
        GenerationSettings(public_only=True, private_tokens=4)


def test_a_stored_spec_keeps_its_settings_and_its_cache_key():
    old = _old_dump(mode="fixed", num_subsets=4)
    task = stored_task(old)
    assert {k: getattr(task.generation, k) for k in LEGACY_GENERATION} == LEGACY_GENERATION
    assert task.generation.num_subsets == 4
    assert cache_key(task, META, "g") == legacy_cache_key(task, META, "g")
    # The same spec read as a new task would take today's defaults: another key, a new charged set.
    assert cache_key(TaskConfig.model_validate(old), META, "g") != cache_key(task, META, "g")


def test_a_spec_stored_today_reads_back_unchanged():
    for generation in ({}, {"public_only": True}, {"mechanism": "gaussian", "sigma": 2.0}, {"private_tokens": None}):
        task = TaskConfig(**BASE, generation=generation)
        again = stored_task(task.model_dump(mode="json"))
        assert again == task and cache_key(again, META, "g") == cache_key(task, META, "g")


def test_the_registry_reads_stored_tasks_with_their_old_settings(tmp_path):
    store = SqliteStore(str(tmp_path / "s.db"))
    store.put_task("old", {**_old_dump(), "name": "old"})
    registry = TaskRegistry(config_from_dict({}, env={}), store, recheck=0)

    async def both() -> tuple[TaskConfig | None, TaskConfig | None]:
        await registry.put(TaskConfig(**{**BASE, "name": "new"}))
        return await registry.get("old"), await registry.get("new")

    old, new = anyio.run(both)
    assert old is not None and new is not None
    assert (old.generation.label_hint, old.generation.guidance, old.generation.private_tokens) == ("word", 1.0, None)

    async def reread() -> tuple[TaskConfig | None, TaskConfig | None]:
        await registry.refresh(force=True)  # re-read both from the store, as another replica would
        return await registry.get("old"), await registry.get("new")

    old_again, new_again = anyio.run(reread)
    assert old_again == old
    assert new_again is not None and new_again.generation.label_hint == "alias"
    assert (new_again.generation.guidance, new_again.generation.private_tokens) == (3.0, 4)
