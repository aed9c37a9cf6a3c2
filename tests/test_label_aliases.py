"""Neutral label aliases in generation (issue 19 section 2): generation shows "type A", "type B", ...
over the public label domain; injected demonstrations keep the real label words."""

from __future__ import annotations

import hashlib
import json

import pytest

from aggregation.evaluation.runs import settings_record
from aggregation.evaluation.settings import FULL
from aggregation.fewshot import GenerationConfig, generate_demonstration, plan_demonstrations
from aggregation.mechanisms import Noise
from aggregation.prompts import Example, TaskPrompt, neutral_aliases
from proxy.task_config import TaskConfig, stored_task
from proxy.serving.tasks import task_prompt
from tests.test_fewshot import RecordingSource

OPAQUE = TaskPrompt("Classify the questions into one of these labels: marble, pencil, river.",
                    "Question:", "Label:", (("DESC", "marble"), ("LOC", "river"), ("NUM", "pencil")))
DOMAIN = ["DESC", "NUM", "LOC"]


def test_neutral_aliases_are_numbered_over_the_public_domain_only():
    assert neutral_aliases(DOMAIN) == (("DESC", "type A"), ("NUM", "type B"), ("LOC", "type C"))
    many = dict(neutral_aliases([f"l{i}" for i in range(30)]))
    assert many["l25"] == "type Z" and many["l26"] == "type AA" and len(set(many.values())) == 30


def test_generation_shows_aliases_and_serving_keeps_the_words():
    p = OPAQUE.with_hint("alias", DOMAIN)
    gen = p.generation_prompt([Example("What is a thing ?", "DESC")], "LOC")
    assert "Label: type A\nQuestion: What is a thing ?" in gen
    assert gen.endswith("Label: type C\nQuestion:")
    assert p.shared_prefix() == "Classify the questions into one of these labels: type A, type B, type C."
    for word in ("marble", "pencil", "river"):
        assert word not in gen
    served = p.serving_prefix([Example("Where is Rome ?", "LOC")])
    assert served == OPAQUE.serving_prefix([Example("Where is Rome ?", "LOC")])
    assert "Label: river" in served and "type" not in served
    # The word hint is exactly today's prompt.
    assert OPAQUE.with_hint("word", DOMAIN).generation_prompt([], "LOC") == OPAQUE.generation_prompt([], "LOC")
    with pytest.raises(ValueError):
        OPAQUE.with_hint("nope", DOMAIN)  # type: ignore[arg-type]


def test_whole_words_only_are_replaced_in_the_instruction():
    p = TaskPrompt("Labels: num, numbers are not num-like.", label_words=(("N", "num"),)).with_hint("alias", ["N"])
    assert p.shared_prefix() == "Labels: type A, numbers are not type A-like."


def test_the_generator_sees_only_aliases_and_returns_the_real_label():
    src = RecordingSource(True)
    config = GenerationConfig(mode="fixed", mechanism="public_prior", num_subsets=3, shots_per_subset=2,
                              max_tokens=3, top_k=5, epsilon=4.0)
    pool = [Example(f"How far is place {i} ?", "LOC") for i in range(40)]
    plan = plan_demonstrations(config, {"LOC": 1}, {"LOC": 40.0}, 1e-5)
    demo = generate_demonstration(src, OPAQUE.with_hint("alias", DOMAIN), pool, "LOC", config, plan.labels["LOC"],
                                  Noise(0))
    assert demo.label == "LOC"
    assert src.texts and all("type C" in t for t in src.texts)
    assert not any(w in t for t in src.texts for w in ("marble", "pencil", "river"))


def _task(**generation) -> TaskConfig:
    return TaskConfig(name="t", dataset="d", instruction="Classify: marble, river.",
                      label_words={"DESC": "marble", "LOC": "river"}, generation=generation)


def test_task_setting_changes_the_generation_prompt_and_the_cache_key_only_when_set():
    # A task stored before label_hint existed reads as word; a new task generates with aliases.
    word = stored_task({"name": "t", "dataset": "d", "instruction": "Classify: marble, river.",
                        "label_words": {"DESC": "marble", "LOC": "river"}})
    alias = _task()
    assert (word.generation.label_hint, alias.generation.label_hint) == ("word", "alias")
    old_hash = hashlib.sha256(json.dumps({
        "instruction": word.instruction, "input_prefix": word.input_prefix, "label_prefix": word.label_prefix,
        "label_words": sorted(word.label_words.items())}, sort_keys=True).encode()).hexdigest()
    assert word.template_hash() == old_hash  # existing tasks keep their cached sets
    assert alias.template_hash() != old_hash
    assert task_prompt(word, ["DESC", "LOC"]).public_prompt("LOC").endswith("Label: river\nText:")
    assert task_prompt(alias, ["DESC", "LOC"]).public_prompt("LOC").endswith("Label: type B\nText:")
    with pytest.raises(ValueError):
        _task(label_hint="emoji")


def test_eval_settings_record_keeps_old_settings_files_resumable():
    assert "label_hint" not in settings_record(FULL, "trec")
    from dataclasses import replace

    assert settings_record(replace(FULL, label_hint="alias"), "trec")["label_hint"] == "alias"


def test_eval_settings_record_keeps_the_width_only_when_set():
    """Directories written before --max-prompt-tokens (width 256) stay resumable; another width is
    a different setting, so a resume into a directory of the other width is refused."""
    from dataclasses import replace

    assert "max_prompt_tokens" not in settings_record(FULL, "trec")
    assert settings_record(replace(FULL, max_prompt_tokens=104), "trec")["max_prompt_tokens"] == 104
    assert replace(FULL, max_prompt_tokens=104).generation("fixed", 1.0).max_prompt_tokens == 104
