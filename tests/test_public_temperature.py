"""``public_temperature``: the temperature of the tokens the public prompt decodes alone (after a
private prefix; every token of an epsilon-0 demonstration). Those tokens read no private row, so the
setting is outside the accounting; the private tokens, their noise and their event do not change."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from aggregation import fewshot
from aggregation.evaluation.runs import settings_record
from aggregation.evaluation.settings import QUICK, EvalSettings
from aggregation.fewshot import GenerationConfig, generate_demonstration, plan_demonstrations
from aggregation.mechanisms import Noise
from tests.test_fewshot import NEVER_STOP, POOL

#: Far below any gap between two log-probabilities of the tiny model: sampling is greedy.
COLD = 1e-9


@pytest.fixture(scope="module")
def source():
    from tests.tiny_model import tiny_source

    return tiny_source()


def _config(**extra) -> GenerationConfig:
    return GenerationConfig(mode="fixed", mechanism="public_prior", num_subsets=4, shots_per_subset=2, max_tokens=8,
                            private_tokens=3, top_k=20, epsilon=2.0, **extra)


def _greedy_public(source, label: str, start: list) -> list:
    prefix = fewshot._shared_prefix(source, NEVER_STOP, label)
    public_prompt = fewshot._body(NEVER_STOP, (), label, prefix)
    tokens = list(start)
    while len(tokens) < 8:
        tokens.append(source.open([public_prompt], suffix=tokens, prefix=prefix).top_tokens(1)[0])
    return tokens


def test_the_public_tokens_take_it_and_the_private_prefix_and_its_charge_do_not(source):
    warm, cold = _config(), _config(public_temperature=COLD)
    plan_warm = plan_demonstrations(warm, {"LOC": 1}, {"LOC": 60.0}, 1e-4).labels["LOC"]
    plan_cold = plan_demonstrations(cold, {"LOC": 1}, {"LOC": 60.0}, 1e-4).labels["LOC"]
    assert (plan_cold.clip, plan_cold.temperature, plan_cold.epsilon_per_token) == \
        (plan_warm.clip, plan_warm.temperature, plan_warm.epsilon_per_token)
    a = generate_demonstration(source, NEVER_STOP, POOL, "LOC", warm, plan_warm, Noise(5))
    b = generate_demonstration(source, NEVER_STOP, POOL, "LOC", cold, plan_cold, Noise(5))
    assert a.event == b.event
    assert a.token_ids[:3] == b.token_ids[:3]  # the same noise draws the same private prefix
    assert b.tokens == 8 and list(b.token_ids) == _greedy_public(source, "LOC", b.token_ids[:3])


def test_an_epsilon_0_demonstration_takes_it(source):
    config = replace(_config(public_temperature=COLD), public_only=True)
    plan = plan_demonstrations(config, {"LOC": 1}, {}, 1e-4).labels["LOC"]
    demo = generate_demonstration(source, NEVER_STOP, POOL, "LOC", config, plan, Noise(2))
    assert list(demo.token_ids) == _greedy_public(source, "LOC", [])


@pytest.mark.parametrize("bad", [{"public_temperature": 0.0}, {"public_temperature": math.inf},
                                 {"public_temperature": 0.5, "mechanism": "gaussian"}])
def test_bad_values_are_refused(bad):
    with pytest.raises(ValueError):
        GenerationConfig(**{"mechanism": "public_prior", **bad}).validate()
    with pytest.raises(ValueError):
        EvalSettings(**{"mechanism": "public_prior", **bad})


def test_eval_settings_pass_both_temperatures_and_keep_old_directories_resumable():
    record = settings_record(QUICK, "trec")
    assert "public_temperature" not in record and "temperature" not in record
    settings = replace(QUICK, mechanism="public_prior", temperature=0.5, public_temperature=0.7)
    assert settings_record(settings, "trec")["public_temperature"] == 0.7
    assert settings_record(settings, "trec")["temperature"] == 0.5
    config = settings.generation("fixed", 1.0)
    assert (config.temperature, config.public_temperature) == (0.5, 0.7)


@pytest.mark.parametrize("args", [["--public-temperature", "0"], ["--temperature", "-1"],
                                  ["--public-temperature", "0.5", "--mechanism", "gaussian"],
                                  ["--temperature", "2", "--mechanism", "exponential"]])
def test_cli_eval_refuses_bad_temperatures_before_loading_anything(args, tmp_path):
    from proxy.cli import app

    result = CliRunner().invoke(app, ["eval", "--quick", "--out", str(tmp_path / "out"), *args])
    assert result.exit_code != 0
    assert "temperature" in result.output
    assert not (tmp_path / "out").exists()
