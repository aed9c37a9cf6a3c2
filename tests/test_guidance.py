"""Public-prior guidance (``generation.guidance``, ``--guidance``): it reaches the mechanism, it is
refused where it has no meaning, it changes no charge, and old cache keys and eval directories stay."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from pydantic import ValidationError

from aggregation.evaluation.runs import settings_record
from aggregation.evaluation.settings import QUICK
from aggregation.fewshot import GenerationConfig, generate_demonstration, plan_demonstrations
from aggregation.mechanisms import Noise
from proxy.task_config import TaskConfig, stored_task
from proxy.serving.demos import cache_key
from proxy.serving.tasks import generation_config
from proxy.store.base import DatasetMeta
from tests.test_app_support import legacy_cache_key
from tests.test_fewshot import NEVER_STOP, POOL

LABELS = ["DESC", "LOC"]


def _task(**generation) -> TaskConfig:
    return TaskConfig(name="t", dataset="d", instruction="Classify.", generation=generation)


def test_task_guidance_reaches_the_generator_config_and_is_refused_off_the_public_prior():
    assert generation_config(_task(guidance=2.5)).guidance == 2.5
    assert generation_config(_task()).guidance == 3.0  # the public prior's default
    assert generation_config(_task(mechanism="gaussian", sigma=1.0)).guidance == 1.0  # others take none
    for bad in ({"guidance": 0}, {"guidance": -1}, {"guidance": 1e9},
                {"guidance": 2.0, "mechanism": "gaussian", "sigma": 1.0}):
        with pytest.raises(ValidationError):
            _task(**bad)


def test_cache_key_keeps_old_tasks_and_changes_with_guidance():
    meta = DatasetMeta(id="ds_1", rows=3, created_at=0.0, budget_epsilon=4.0, budget_delta=1e-5, labels=LABELS,
                       name="d", version=1)
    plain = stored_task({"name": "t", "dataset": "d", "instruction": "Classify.", "generation": {}})
    assert plain.generation.guidance == 1.0  # a task stored before guidance existed keeps meaning none
    old = legacy_cache_key(plain, meta, "g")  # the key as computed before guidance existed
    assert cache_key(plain, meta, "g") == old
    assert cache_key(_task(guidance=2.0), meta, "g") != old


def test_eval_settings_keep_old_directories_resumable():
    assert "guidance" not in settings_record(replace(QUICK, guidance=1.0), "trec")
    assert settings_record(replace(QUICK, guidance=3.0, mechanism="public_prior"), "trec")["guidance"] == 3.0
    assert replace(QUICK, guidance=3.0, mechanism="public_prior").generation("fixed", 1.0).guidance == 3.0
    with pytest.raises(ValueError, match="public_prior mechanism only"):
        replace(QUICK, guidance=3.0, mechanism="gaussian")


@pytest.fixture(scope="module")
def source():
    from tests.tiny_model import tiny_source

    return tiny_source()


@pytest.mark.parametrize("epsilon", [2.0, math.inf])
def test_generation_passes_guidance_to_the_mechanism_and_charges_the_same(source, monkeypatch, epsilon):
    from aggregation import fewshot

    seen: list[float] = []
    real = fewshot.public_prior_sample

    def spy(private_lp, public_lp, clip, tau, noise, guidance=1.0):
        seen.append(guidance)
        return real(private_lp, public_lp, clip, tau, noise, guidance)

    monkeypatch.setattr(fewshot, "public_prior_sample", spy)
    events = []
    for g in (1.0, 4.0):
        config = GenerationConfig(mode="fixed", mechanism="public_prior", num_subsets=3, shots_per_subset=2,
                                  max_tokens=3, top_k=10, epsilon=epsilon, max_prompt_tokens=160, guidance=g)
        plan = plan_demonstrations(config, {"LOC": 1}, {"LOC": 60.0}, 1e-4)
        seen.clear()
        demo = generate_demonstration(source, NEVER_STOP, POOL, "LOC", config, plan.labels["LOC"], Noise(1))
        assert seen and set(seen) == {g}
        events.append((demo.event, plan.labels["LOC"].clip))
    assert events[0] == events[1]  # the same event and clip: guidance is not paid for


def test_cli_refuses_guidance_where_it_means_nothing(tmp_path):
    from typer.testing import CliRunner

    from proxy.cli import app

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "label": "x"}\n')
    runner = CliRunner()
    for args, message in (
        (["eval", "--guidance", "0", "--out", str(tmp_path)], "positive finite"),
        (["eval", "--guidance", "2", "--mechanism", "gaussian", "--out", str(tmp_path)], "public_prior mechanism only"),
        (["generate", "--data", str(data), "--label", "x", "--epsilon", "1", "--mechanism", "gaussian",
          "--guidance", "2"], "public_prior mechanism only"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
