"""A private prefix (``generation.private_tokens`` P, ``--private-tokens``): only the first P tokens
read private rows and are charged; the rest continue the public prompt after them for free."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import httpx
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from aggregation import fewshot
from aggregation.evaluation.runs import settings_record
from aggregation.evaluation.settings import QUICK
from aggregation.fewshot import GenerationConfig, generate_demonstration, plan_demonstrations
from aggregation.mechanisms import Noise
from aggregation.prompts import Example
from proxy.app import create_app
from proxy.task_config import TaskConfig, stored_task
from proxy.serving.demos import cache_key
from proxy.serving.tasks import generation_config
from proxy.store.base import DatasetMeta
from tests.test_app_support import (  # noqa: F401 - fixtures
    LABELS, LiveServer, admin_headers, dataset_rows, fake_upstream, jsonl_bytes, legacy_cache_key, make_config,
    task_spec, tiny_model_dir, upload,
)
from tests.test_fewshot import NEVER_STOP, POOL
from tests.test_privacy_neighbours import FAST

MECHANISMS = [
    {"mechanism": "gaussian", "epsilon": 4.0},
    {"mechanism": "exponential", "epsilon": 4.0},
    {"mechanism": "public_prior", "epsilon": 4.0},
    {"mechanism": "public_prior", "epsilon": math.inf},
]
MODES = [("fixed", None), ("resample", None), ("block", 2)]


@pytest.fixture(scope="module")
def source():
    from tests.tiny_model import tiny_source

    return tiny_source()


@pytest.mark.parametrize("mode,k", MODES)
@pytest.mark.parametrize("mech", MECHANISMS[:3])
def test_the_charge_and_the_noise_are_those_of_a_p_token_demonstration(mode, k, mech):
    base = dict(mode=mode, block_tokens=k, num_subsets=4, shots_per_subset=2, top_k=20, **mech)
    with_prefix = plan_demonstrations(GenerationConfig(max_tokens=12, private_tokens=3, **base),
                                      {"LOC": 2}, {"LOC": 60.0}, 1e-5)
    short = plan_demonstrations(GenerationConfig(max_tokens=3, **base), {"LOC": 2}, {"LOC": 60.0}, 1e-5)
    full = plan_demonstrations(GenerationConfig(max_tokens=12, **base), {"LOC": 2}, {"LOC": 60.0}, 1e-5)
    a, b, c = with_prefix.labels["LOC"], short.labels["LOC"], full.labels["LOC"]
    assert a.event == b.event and (a.sigma, a.epsilon_per_token, a.clip) == (b.sigma, b.epsilon_per_token, b.clip)
    assert with_prefix.epsilon() == pytest.approx(short.epsilon())
    # The same epsilon target buys fewer, stronger private tokens.
    if mech["mechanism"] == "gaussian":
        assert a.sigma < c.sigma
    else:
        assert a.epsilon_per_token > c.epsilon_per_token
    # P >= T is the plain configuration.
    same = plan_demonstrations(GenerationConfig(max_tokens=12, private_tokens=40, **base), {"LOC": 2},
                               {"LOC": 60.0}, 1e-5)
    assert same.labels["LOC"].event == c.event


class _Watched(list):
    """A private pool that records at which generation step each row was read."""

    def __init__(self, rows, steps):
        super().__init__(rows)
        self.steps, self.reads = steps, []

    def __getitem__(self, i):
        self.reads.append(len(self.steps))
        return super().__getitem__(i)


@pytest.mark.parametrize("mode,k", MODES)
@pytest.mark.parametrize("mech", MECHANISMS)
def test_no_private_row_is_read_after_token_p(source, monkeypatch, mode, k, mech):
    opened = []
    real_open = type(source).open

    def spy(self, prompts, suffix=(), keep_state=False, width=None, prefix=""):
        opened.append((len(steps), len(prompts), width))
        return real_open(self, prompts, suffix, keep_state, width, prefix)

    monkeypatch.setattr(type(source), "open", spy)
    config = GenerationConfig(mode=mode, block_tokens=k, num_subsets=3, shots_per_subset=2, max_tokens=7,
                              private_tokens=3, top_k=10, max_prompt_tokens=120, **mech)
    plan = plan_demonstrations(config, {"LOC": 1}, {"LOC": 6.0}, 1e-4)  # q = 1: every row is drawn
    steps: list[int] = []
    pool = _Watched(POOL[:6], steps)
    demo = generate_demonstration(source, NEVER_STOP, pool, "LOC", config, plan.labels["LOC"], Noise(2),
                                  on_token=steps.append)
    assert demo.tokens == 7  # the public continuation wrote the rest
    assert pool.reads and max(pool.reads) < 3
    private_opens = [step for step, rows, width in opened if width is not None]
    assert private_opens and max(private_opens) < 3
    # After the prefix only the public prompt is open, one row, at no public width (nothing private to hide).
    assert all(rows == 1 and width is None for step, rows, width in opened if step >= 3)


@pytest.mark.parametrize("pool", [POOL, [Example(f"Who wrote book number {i} ?", "LOC") for i in range(60)]])
def test_the_continuation_is_the_public_prompts_greedy_decoding_after_the_prefix(source, pool):
    """Gaussian mechanism: the public continuation is greedy, so tokens P+1.. are a function of the
    public prompt and the released prefix alone, whatever the private pool holds."""
    config = GenerationConfig(mode="fixed", num_subsets=4, shots_per_subset=2, max_tokens=8, private_tokens=3,
                              top_k=20, epsilon=2.0)
    plan = plan_demonstrations(config, {"LOC": 1}, {"LOC": 60.0}, 1e-4)
    demo = generate_demonstration(source, NEVER_STOP, pool, "LOC", config, plan.labels["LOC"], Noise(4))
    assert demo.tokens == 8
    prefix = fewshot._shared_prefix(source, NEVER_STOP, "LOC")
    public_prompt = fewshot._body(NEVER_STOP, (), "LOC", prefix)
    expected = list(demo.token_ids[:3])
    for _ in range(5):
        state = source.open([public_prompt], suffix=expected, prefix=prefix)
        expected.append(state.top_tokens(1)[0])
    assert list(demo.token_ids) == expected


def test_p_at_least_t_generates_exactly_the_plain_configuration(source):
    base = dict(mode="fixed", num_subsets=3, shots_per_subset=2, max_tokens=5, top_k=10, mechanism="public_prior",
                epsilon=3.0)
    plain = GenerationConfig(**base)
    long = GenerationConfig(**base, private_tokens=5)
    a = generate_demonstration(source, NEVER_STOP, POOL, "LOC", plain,
                               plan_demonstrations(plain, {"LOC": 1}, {"LOC": 60.0}, 1e-4).labels["LOC"], Noise(9))
    b = generate_demonstration(source, NEVER_STOP, POOL, "LOC", long,
                               plan_demonstrations(long, {"LOC": 1}, {"LOC": 60.0}, 1e-4).labels["LOC"], Noise(9))
    assert a.token_ids == b.token_ids and a.event == b.event


def _task(**generation) -> TaskConfig:
    return TaskConfig(name="t", dataset="d", instruction="Classify.", generation=generation)


def test_task_setting_reaches_the_generator_keeps_old_cache_keys_and_refuses_public_only():
    assert generation_config(_task(private_tokens=4)).private_tokens == 4
    assert generation_config(_task()).private_tokens == 4  # the default
    assert generation_config(_task(private_tokens=None)).private_tokens is None  # null: every token private
    for bad in ({"private_tokens": 0}, {"private_tokens": 4, "public_only": True}):
        with pytest.raises(ValidationError):
            _task(**bad)
    meta = DatasetMeta(id="ds_1", rows=3, created_at=0.0, budget_epsilon=4.0, budget_delta=1e-5,
                       labels=["LOC"], name="d", version=1)
    plain = stored_task({"name": "t", "dataset": "d", "instruction": "Classify.", "generation": {}})
    assert plain.generation.private_tokens is None  # a task stored before the field: every token private
    old = legacy_cache_key(plain, meta, "g")  # the key as computed before private_tokens existed
    assert cache_key(plain, meta, "g") == old
    assert cache_key(_task(private_tokens=4), meta, "g") != old


def test_eval_settings_keep_old_directories_resumable():
    assert "private_tokens" not in settings_record(QUICK, "trec")
    assert settings_record(replace(QUICK, private_tokens=4), "trec")["private_tokens"] == 4
    assert replace(QUICK, private_tokens=4).generation("fixed", 1.0).private_tokens == 4


def test_cli_generate_refuses_a_prefix_below_one_token(tmp_path):
    from proxy.cli import app

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"Where is city {i} ?", "label": "LOC"}) + "\n" for i in range(40)))
    runner = CliRunner()
    bad = runner.invoke(app, ["generate", "--data", str(data), "--label", "LOC", "--epsilon", "2",
                              "--private-tokens", "0"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def _gaussian_multipliers(event: dict) -> list[float]:
    out = [event["noise_multiplier"]] if event.get("type") == "GaussianDpEvent" else []
    for value in event.values():
        for sub in value if isinstance(value, list) else [value]:
            if isinstance(sub, dict):
                out += _gaussian_multipliers(sub)
    return out


def test_a_served_task_charges_its_private_prefix_alone(tmp_path, fake_upstream, tiny_model_dir):
    """Through the app: the ledger holds the P-token event (fixed mode, Gaussian: multiplier sigma/sqrt(P))."""
    app = create_app(make_config(f"sqlite:///{tmp_path}/s.db", fake_upstream.base_url, tiny_model_dir))
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=600, headers=admin_headers()) as http:
        assert upload(http, "qs", jsonl_bytes(dataset_rows(40)), labels=LABELS, epsilon=50).status_code == 201
        gen = {**FAST, "max_tokens": 4, "private_tokens": 1}  # sigma 1.5
        assert http.post("/admin/tasks", json=task_spec("a", "qs", generation=gen)).status_code == 201
        warmed = http.post("/admin/tasks/a/demos", json={"wait": True})
        assert warmed.status_code == 200, warmed.text
        ledger = http.get("/admin/budget/qs").json()["ledger"]
        multipliers = [m for e in ledger if e["kind"] == "warmup" for m in _gaussian_multipliers(e["event"])]
        assert multipliers and all(m == pytest.approx(1.5) for m in multipliers)  # not 1.5 / sqrt(4)
