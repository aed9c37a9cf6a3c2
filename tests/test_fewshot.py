"""Generator mechanics on a tiny random model; one real-model test (slow)."""

import math

import dp_accounting as dpa
import numpy as np
import pytest

from aggregation import accounting
from aggregation.fewshot import (
    GenerationConfig,
    generate_demonstration,
    noisy_pool_sizes,
    plan_demonstrations,
    pools_by_label,
)
from aggregation.mechanisms import Noise, demonstration_event
from aggregation.prompts import Example, TaskPrompt
from aggregation.sources.base import DecodeState, NextTokenSource
from tests.tiny_model import tiny_source

PROMPT = TaskPrompt("Write a question.", "Question:", "Answer type:", (("LOC", "location"),))
POOL = [Example(f"Where is city number {i} located ?", "LOC") for i in range(60)]


class _NeverStop(TaskPrompt):
    @property
    def stop(self) -> str:
        return "\x00never\x00"


NEVER_STOP = _NeverStop(PROMPT.instruction, PROMPT.input_prefix, PROMPT.label_prefix, PROMPT.label_words)


@pytest.fixture(scope="module")
def source():
    return tiny_source()


def _plan(config, n=60, shots=1, delta=1e-4):
    return plan_demonstrations(config, {"LOC": shots}, {"LOC": float(n)}, delta)


def test_kv_cached_decoding_matches_full_reencode(source):
    prompts = ["Question: where", "Answer type: location\nQuestion: Where is the longest river in the world"]
    cached = source.open(prompts, keep_state=True)
    suffix = []
    for tok in source.encode(" and why is it so"):
        cached.advance(tok)
        suffix.append(tok)
        fresh = source.open(prompts, suffix=suffix, keep_state=False)
        np.testing.assert_allclose(cached.probs(None), fresh.probs(None), atol=2e-5)
    # Left padding does not change a row's distribution.
    alone = source.open(prompts[:1], suffix=suffix)
    np.testing.assert_allclose(alone.probs(None)[0], fresh.probs(None)[0], atol=2e-5)


@pytest.mark.parametrize("mode", ["resample", "fixed"])
def test_generation_mechanics(source, mode):
    config = GenerationConfig(mode=mode, num_subsets=4, shots_per_subset=2, max_tokens=6, top_k=20, sigma=0.5)
    plan = _plan(config)
    demo = generate_demonstration(source, PROMPT, POOL, "LOC", config, plan.labels["LOC"], Noise(0))
    assert demo.tokens <= 6
    assert "\n" not in demo.text
    assert demo.event == demonstration_event(mode, 8 / 60, 6, sigma=0.5)
    if mode == "fixed":
        # one prefill per state (public + private), then one decode step each per generated token
        assert demo.model_calls <= 2 * (1 + demo.tokens)
    else:
        assert demo.model_calls >= demo.tokens


def test_seeded_generation_is_reproducible(source):
    config = GenerationConfig(num_subsets=3, shots_per_subset=2, max_tokens=5, top_k=10, sigma=0.3)
    plan = _plan(config)
    a = generate_demonstration(source, PROMPT, POOL, "LOC", config, plan.labels["LOC"], Noise(7))
    b = generate_demonstration(source, PROMPT, POOL, "LOC", config, plan.labels["LOC"], Noise(7))
    assert a.token_ids == b.token_ids


def test_full_vocabulary_and_exponential_mechanism(source):
    config = GenerationConfig(num_subsets=2, shots_per_subset=2, max_tokens=3, top_k=None,
                              mechanism="exponential", epsilon=6.0)
    plan = _plan(config)
    lp = plan.labels["LOC"]
    assert lp.epsilon_per_token is not None and lp.sigma is None
    assert accounting.epsilon_of([plan.charges()[0][1]], 1e-4) <= 6.0
    demo = generate_demonstration(source, PROMPT, POOL, "LOC", config, lp, Noise(1))
    assert demo.tokens <= 3


def test_public_only_reads_no_private_data_and_costs_nothing(source):
    config = GenerationConfig(public_only=True, max_tokens=4, top_k=5)
    plan = _plan(config)
    assert isinstance(plan.labels["LOC"].event, dpa.NoOpDpEvent)

    class Exploding(list):
        def __getitem__(self, i):
            raise AssertionError("private pool was read")

        def __len__(self):
            return 60

    demo = generate_demonstration(source, PROMPT, Exploding(), "LOC", config, plan.labels["LOC"], Noise(0))
    again = generate_demonstration(source, PROMPT, Exploding(), "LOC", config, plan.labels["LOC"], Noise(1))
    assert demo.token_ids == again.token_ids  # greedy on the public prompt: no randomness


def test_infinite_epsilon_is_non_private(source):
    config = GenerationConfig(num_subsets=2, shots_per_subset=2, max_tokens=3, top_k=10, epsilon=math.inf)
    plan = _plan(config)
    assert isinstance(plan.labels["LOC"].event, dpa.NonPrivateDpEvent)
    assert math.isinf(plan.epsilon())


def test_plan_calibrates_each_label_to_the_target():
    config = GenerationConfig(num_subsets=5, shots_per_subset=2, max_tokens=8, epsilon=2.0)
    plan = plan_demonstrations(config, {"a": 2, "b": 1}, {"a": 500.0, "b": 100.0}, 1e-5)
    assert plan.labels["a"].q == pytest.approx(10 / 500)
    assert plan.labels["b"].q == pytest.approx(10 / 100)
    for lp in plan.labels.values():
        assert accounting.epsilon_of([lp.event], 1e-5) <= 2.0
    assert plan.epsilon() <= 2.0
    # More shots from one pool need more noise each.
    assert plan.labels["a"].sigma > plan_demonstrations(config, {"a": 1}, {"a": 500.0}, 1e-5).labels["a"].sigma


def test_plan_rejects_bad_configs():
    with pytest.raises(ValueError):
        plan_demonstrations(GenerationConfig(epsilon=-1.0), {"a": 1}, {"a": 500.0}, 1e-5)
    with pytest.raises(ValueError):
        plan_demonstrations(GenerationConfig(mode="other"), {"a": 1}, {"a": 500.0}, 1e-5)
    with pytest.raises(ValueError):
        plan_demonstrations(GenerationConfig(small_pool="fail"), {"a": 1}, {"a": 500.0}, 1e-5)
    with pytest.raises(ValueError):  # a threshold below M*N would need q > 1
        plan_demonstrations(GenerationConfig(min_pool=5), {"a": 1}, {"a": 500.0}, 1e-5)


@pytest.mark.parametrize("policy", ["public", "skip"])
def test_small_pools_never_fail_the_plan_and_the_decision_follows_the_noisy_count(policy):
    """One row can move a noisy count across the threshold; it must change a decision, never raise."""
    config = GenerationConfig(num_subsets=5, shots_per_subset=2, max_tokens=6, epsilon=2.0, small_pool=policy)
    sizes = {"big": 400.0, "edge_in": 10.0, "edge_out": 9.99, "negative": -7.3, "nan": float("nan")}
    plan = plan_demonstrations(config, {lab: 1 for lab in [*sizes, "missing"]}, sizes, 1e-5)
    got = {lab: lp.decision for lab, lp in plan.labels.items()}
    assert got == {"big": "private", "edge_in": "private", **{lab: policy for lab in
                                                              ("edge_out", "negative", "nan", "missing")}}
    assert plan.labels["edge_in"].q == 1.0
    for lab in ("edge_out", "negative", "nan", "missing"):
        lp = plan.labels[lab]
        assert isinstance(lp.event, dpa.NoOpDpEvent) and lp.sigma is None
        assert "below 10" in lp.rule
    # Every planned label is charged (a no-op for fallbacks), so the ledger's partitions are the
    # label set whatever the decisions; the set still meets the target.
    assert [part for part, _ in plan.charges()] == list(plan.labels)
    assert plan.epsilon() <= 2.0
    expected = [lab for lab in plan.labels if got[lab] != "skip"]
    assert plan.to_generate() == expected
    assert plan.decisions()["big"][0] == "private"
    # A public threshold above M*N moves the line; the decision depends on it and the count only.
    strict = plan_demonstrations(GenerationConfig(num_subsets=5, shots_per_subset=2, max_tokens=6, epsilon=2.0,
                                                  small_pool=policy, min_pool=50), {"a": 1, "b": 1},
                                 {"a": 49.0, "b": 50.0}, 1e-5)
    assert strict.labels["a"].decision == policy and strict.labels["b"].decision == "private"


def test_a_public_fallback_label_reads_no_private_row_and_a_skipped_one_refuses(source):
    class Exploding(list):
        def __getitem__(self, i):
            raise AssertionError("private pool was read")

        def __len__(self):
            return 3

    config = GenerationConfig(num_subsets=4, shots_per_subset=2, max_tokens=4, top_k=5, sigma=1.0)
    plan = plan_demonstrations(config, {"LOC": 1}, {"LOC": 3.0}, 1e-4)
    lp = plan.labels["LOC"]
    assert lp.decision == "public"
    demo = generate_demonstration(source, PROMPT, Exploding(), "LOC", config, lp, Noise(0))
    public = generate_demonstration(source, PROMPT, (), "LOC", GenerationConfig(public_only=True, max_tokens=4,
                                                                                 top_k=5),
                                    plan_demonstrations(GenerationConfig(public_only=True), {"LOC": 1}, {}, 0.5)
                                    .labels["LOC"], Noise(1))
    assert demo.token_ids == public.token_ids  # exactly the epsilon-0 demonstration
    assert isinstance(demo.event, dpa.NoOpDpEvent)
    skip = plan_demonstrations(GenerationConfig(num_subsets=4, shots_per_subset=2, small_pool="skip", sigma=1.0),
                               {"LOC": 1}, {"LOC": 3.0}, 1e-4)
    with pytest.raises(ValueError, match="skips"):
        generate_demonstration(source, PROMPT, Exploding(), "LOC", config, skip.labels["LOC"], Noise(0))


def test_public_only_with_the_full_vocabulary_decodes_greedily(source):
    config = GenerationConfig(public_only=True, max_tokens=3, top_k=None)
    lp = plan_demonstrations(config, {"LOC": 1}, {}, 0.5).labels["LOC"]
    demo = generate_demonstration(source, NEVER_STOP, (), "LOC", config, lp, Noise(0))
    state = source.open([NEVER_STOP.public_prompt("LOC")])
    assert demo.token_ids[0] == int(np.argmax(state.probs(None)[0]))


def test_noisy_pool_sizes_are_noisy_and_charged():
    counts = {"a": 1000, "b": 50}
    sizes, event = noisy_pool_sizes(counts, Noise(3))
    assert set(sizes) == {"a", "b"} and sizes != {k: float(v) for k, v in counts.items()}
    assert isinstance(event, dpa.GaussianDpEvent) and event.noise_multiplier > 1


def test_pools_by_label_are_disjoint():
    recs = [Example("x", "a"), Example("y", "b"), Example("z", "a")]
    pools = pools_by_label(recs)
    assert [e.text for e in pools["a"]] == ["x", "z"] and [e.text for e in pools["b"]] == ["y"]


@pytest.mark.slow
@pytest.mark.ci
def test_real_smollm2_generates_a_trec_question_at_epsilon_8():
    from aggregation.datasets import TREC_PROMPT, load_trec
    from aggregation.sources.local import LocalSource

    records = load_trec()
    pools = pools_by_label(records)
    config = GenerationConfig(mode="resample", num_subsets=10, shots_per_subset=2, max_tokens=15, epsilon=8.0)
    plan = plan_demonstrations(config, {"LOC": 1}, {k: float(len(v)) for k, v in pools.items()}, 1 / len(records))
    assert plan.epsilon() <= 8.0
    demo = generate_demonstration(LocalSource.from_pretrained(), TREC_PROMPT, pools["LOC"], "LOC", config,
                                  plan.labels["LOC"], Noise(0))
    words = demo.text.split()
    assert len(words) >= 3, demo.text
    assert demo.text not in {r.text for r in records}  # not a verbatim private record
    assert any(c.isalpha() for c in demo.text)


@pytest.mark.parametrize("mode,k", [("fixed", None), ("resample", None), ("block", 2)])
def test_every_mode_pads_every_row_to_the_public_width(source, monkeypatch, mode, k):
    """The public row shares the private batch only with a data-independent batch shape."""
    shapes = []
    real_open = type(source).open

    def spy(self, prompts, suffix=(), keep_state=False, width=None, prefix=""):
        state = real_open(self, prompts, suffix, keep_state, width, prefix)
        shapes.append((len(prompts), len(suffix), state._mask.shape[1]))
        return state

    monkeypatch.setattr(type(source), "open", spy)
    config = GenerationConfig(mode=mode, block_tokens=k, num_subsets=3, shots_per_subset=2, max_tokens=4, top_k=5,
                              sigma=1.0, max_prompt_tokens=120)
    plan = _plan(config)
    for seed in range(3):  # different samples, different natural prompt lengths, same shape
        generate_demonstration(source, NEVER_STOP, POOL, "LOC", config, plan.labels["LOC"], Noise(seed))
    # public + 3 private rows, width 120 plus the tokens generated before the block started
    assert shapes and all(rows == 4 and w == 120 + done for rows, done, w in shapes)


class RecordingSource(NextTokenSource):
    """A fake batched source: uniform distributions over a 50-token vocabulary, one token per word.

    It records what every ``open`` was asked for; nothing about the answers depends on the rows.
    """

    def __init__(self, caches_state: bool):
        self.caches_state = caches_state
        self.opened: list[tuple[int, int, int | None, str]] = []
        self.texts: list[str] = []

    def open(self, prompts, suffix=(), keep_state=False, width=None, prefix=""):
        rows = [prefix + p for p in prompts]
        if width is not None:
            assert all(self.count_tokens(r) + len(suffix) <= width for r in rows)
        self.opened.append((len(prompts), len(suffix), width, prefix))
        self.texts.extend(rows)
        return _UniformState(len(prompts))

    def count_tokens(self, text, prefix=""):
        return len((prefix + text).split())

    def decode(self, tokens):
        return "".join(f" w{t}" for t in tokens)

    def vocabulary(self):
        return range(50)


class _UniformState(DecodeState):
    def __init__(self, rows):
        self.rows, self.calls = rows, 1

    def probs(self, candidates):
        n = 50 if candidates is None else len(candidates)
        return np.full((self.rows, n), 1.0 / 50)

    def top_tokens(self, k):
        return list(range(min(k, 50)))

    def advance(self, token):
        self.calls += 1


@pytest.mark.parametrize("caches_state", [True, False])
@pytest.mark.parametrize("mode,k", [("resample", None), ("fixed", None), ("block", 3)])
def test_batch_shapes_do_not_depend_on_private_prompt_lengths(caches_state, mode, k):
    """D and D + one very long record open the same shapes, step by step (q = 1: always drawn)."""
    pool = [Example(f"short question {i} ?", "LOC") for i in range(8)]
    long = Example("a very long private record " * 30, "LOC")
    config = GenerationConfig(mode=mode, block_tokens=k, num_subsets=4, shots_per_subset=2, max_tokens=7,
                              top_k=5, sigma=1.0, max_prompt_tokens=60)
    plan = plan_demonstrations(config, {"LOC": 1}, {"LOC": 8.0}, 1e-4)
    assert plan.labels["LOC"].q == 1.0
    seen = []
    for data in (pool, [*pool, long]):
        src = RecordingSource(caches_state)
        generate_demonstration(src, NEVER_STOP, data, "LOC", config, plan.labels["LOC"], Noise(5))
        seen.append(src.opened)
        assert all(src.count_tokens(t) <= 60 + 7 for t in src.texts)
    assert seen[0] == seen[1]
    private_opens = [o for o in seen[0] if o[2] is not None]
    assert private_opens and all(w == 60 + done for _, done, w, _ in private_opens)
    assert all(o[3] == NEVER_STOP.shared_prefix() for o in seen[0])  # the instruction is the shared prefix


def test_rows_are_the_same_prompts_split_at_the_shared_prefix(source):
    """Passing the instruction as a prefix changes neither the text nor its tokens."""
    from aggregation.fewshot import _fit_prompt

    prefix = PROMPT.shared_prefix()
    for n in range(4):
        exs = POOL[n: 2 * n]
        body = _fit_prompt(source, PROMPT, exs, "LOC", 256, prefix)
        full = _fit_prompt(source, PROMPT, exs, "LOC", 256)
        assert prefix + body == full == PROMPT.generation_prompt(exs, "LOC")
        assert source.encode(prefix) + source.encode(body) == source.encode(full)
    recorder = RecordingSource(True)
    config = GenerationConfig(num_subsets=3, shots_per_subset=2, max_tokens=2, top_k=5, sigma=1.0)
    generate_demonstration(recorder, NEVER_STOP, POOL, "LOC", config, _plan(config).labels["LOC"], Noise(1))
    assert recorder.texts[0] == NEVER_STOP.public_prompt("LOC")


def test_fitting_counts_the_prefix(source):
    from aggregation.fewshot import _fit_prompt

    prefix = PROMPT.shared_prefix()
    exs = [Example("word " * 12, "LOC"), Example("short one ?", "LOC")]
    width = source.count_tokens(PROMPT.generation_prompt(exs[1:], "LOC")) + 2
    body = _fit_prompt(source, PROMPT, exs, "LOC", width, prefix)
    assert "short one" in body and "word word" not in body
    head, rows = source.segments([body], (), prefix)
    assert len(head) + len(rows[0]) <= width


def test_examples_that_do_not_fit_are_left_out(source):
    from aggregation.fewshot import _fit_prompt

    long = [Example("word " * 200, "LOC"), Example("short one ?", "LOC")]
    text = _fit_prompt(source, PROMPT, long, "LOC", 64)
    assert "short one" in text and "word word" not in text
    assert source.count_tokens(text) <= 64


@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_block_mode_draws_one_poisson_sample_per_block(source, monkeypatch, k):
    import aggregation.fewshot as fewshot

    calls, steps = [], []
    real = fewshot.poisson_subsets

    def counting(*args, **kwargs):
        calls.append(len(steps))  # the step at which the sample was drawn
        return real(*args, **kwargs)

    monkeypatch.setattr(fewshot, "poisson_subsets", counting)
    config = GenerationConfig(mode="block", block_tokens=k, num_subsets=3, shots_per_subset=2, max_tokens=6,
                              top_k=20, sigma=0.5)
    plan = _plan(config)
    generate_demonstration(source, NEVER_STOP, POOL, "LOC", config, plan.labels["LOC"], Noise(3),
                           on_token=steps.append)
    # One sample at the start of each block of k tokens, none in between.
    assert calls == [s for s in range(len(steps)) if s % k == 0]
    assert len(steps) >= 2


def test_block_plans_calibrate_like_resample_at_k_1_and_fixed_at_k_t():
    base = dict(num_subsets=5, shots_per_subset=2, max_tokens=8, epsilon=2.0)
    sig = {name: plan_demonstrations(GenerationConfig(**base, **kw), {"a": 1}, {"a": 400.0}, 1e-5).labels["a"].sigma
           for name, kw in {"resample": dict(mode="resample"), "fixed": dict(mode="fixed"),
                            "k1": dict(mode="block", block_tokens=1), "kT": dict(mode="block", block_tokens=8),
                            "k4": dict(mode="block", block_tokens=4)}.items()}
    assert sig["k1"] == sig["resample"] and sig["kT"] == sig["fixed"]
    assert sig["resample"] < sig["k4"] < sig["fixed"]
    plan = plan_demonstrations(GenerationConfig(**base, mode="block", block_tokens=4), {"a": 1}, {"a": 400.0}, 1e-5)
    assert plan.epsilon() <= 2.0


def test_should_stop_ends_the_generation_before_the_next_token():
    """The warm-up cancel hook: asked before every token (and before a block's private prompts are
    opened), it ends the demonstration there, marked ``stopped``."""
    config = GenerationConfig(mode="resample", block_tokens=2, num_subsets=3, shots_per_subset=2, max_tokens=7,
                              top_k=5, sigma=1.0, max_prompt_tokens=60)
    plan = _plan(config)
    asked = []

    def stop_after_three() -> bool:
        asked.append(1)
        return len(asked) > 3

    src = RecordingSource(True)
    demo = generate_demonstration(src, NEVER_STOP, POOL, "LOC", config, plan.labels["LOC"], Noise(2),
                                  should_stop=stop_after_three)
    assert demo.stopped and demo.tokens == 3 and len(asked) == 4
    # Blocks of 2 tokens: the block that would start at token 3 was never opened (no private sample drawn).
    assert max(done for _, done, w, _ in src.opened if w is not None) == 2
    full = generate_demonstration(RecordingSource(True), NEVER_STOP, POOL, "LOC", config, plan.labels["LOC"], Noise(2),
                                  should_stop=lambda: False)
    assert not full.stopped and full.tokens == 7
