"""The public-prior mechanism: its per-token bound checked numerically, candidates, calibration."""

import math

import numpy as np
import pytest
from scipy import stats
from scipy.special import log_softmax

from aggregation import accounting
from aggregation.fewshot import GenerationConfig, generate_demonstration, plan_demonstrations
from aggregation.mechanisms import (
    Noise,
    demonstration_event,
    public_prior_epsilon_per_token,
    public_prior_sample,
    public_prior_scores,
    top_k_plus,
)
from aggregation.prompts import Example
from tests.test_fewshot import NEVER_STOP, POOL


def _loss(private_a, private_b, pub, clip, tau, guidance=1.0):
    """Privacy-loss vector log P_a(v) - log P_b(v) of the exact sampling distributions."""
    la = log_softmax(public_prior_scores(private_a, pub, clip, guidance) / tau)
    lb = log_softmax(public_prior_scores(private_b, pub, clip, guidance) / tau)
    return la - lb


def _random_logprobs(rng, shape, spread):
    return log_softmax(rng.normal(0.0, spread, shape), axis=-1)


@pytest.mark.parametrize("m,clip,tau,guidance", [(1, 0.5, 1.0, 1.0), (4, 1.0, 1.0, 1.0), (10, 2.0, 0.7, 1.0),
                                                 (10, 0.1, 1.5, 1.0), (10, 1.3, 1.0, 3.0), (4, 1.0, 1.0, 0.5)])
def test_brute_force_privacy_loss_never_exceeds_4c_over_m_tau(m, clip, tau, guidance):
    """Neighbours: one subset's prompt changes arbitrarily (one record added or removed), M fixed.
    Guidance scales each prompt's shift before the clip, so the bound must not move with it."""
    rng = np.random.default_rng(m)
    bound = public_prior_epsilon_per_token(clip, tau, m)
    assert bound == pytest.approx(4 * clip / (m * tau))
    worst_abs = worst_range = 0.0
    for _ in range(400):
        k = int(rng.integers(2, 60))
        spread = float(rng.choice([0.5, 3.0, 12.0]))
        pub = _random_logprobs(rng, k, spread)
        a = _random_logprobs(rng, (m, k), spread)
        b = a.copy()
        i = int(rng.integers(m))
        b[i] = _random_logprobs(rng, k, float(rng.choice([0.5, 3.0, 30.0])))  # arbitrary new row
        if rng.random() < 0.3:
            b[i, rng.integers(k)] = -np.inf  # a token the changed prompt rules out
        loss = _loss(a, b, pub, clip, tau, guidance)
        worst_abs = max(worst_abs, float(np.max(np.abs(loss))))
        worst_range = max(worst_range, float(loss.max() - loss.min()))
    assert worst_abs <= bound + 1e-9  # pure epsilon per token
    assert worst_range <= bound + 1e-9  # bounded range
    # The bound is attained: the changed row pushes token 0 up by C and token 1 down by C, and the
    # neighbour does the opposite; a third token holding almost all mass fixes the normaliser.
    pub = np.log(np.array([1e-9, 1e-9, 1.0 - 2e-9]))
    a = np.tile(pub, (m, 1))
    b = a.copy()
    a[0, 0], a[0, 1] = pub[0] + 10 * clip, pub[1] - 10 * clip
    b[0, 0], b[0, 1] = pub[0] - 10 * clip, pub[1] + 10 * clip
    loss = _loss(a, b, pub, clip, tau, guidance)
    assert loss.max() - loss.min() == pytest.approx(bound, rel=1e-6)


def test_guidance_amplifies_the_mean_shift_without_a_clip_and_saturates_at_the_clip():
    rng = np.random.default_rng(3)
    pub = _random_logprobs(rng, 8, 2.0)
    private = _random_logprobs(rng, (5, 8), 2.0)
    shift = (private - pub).mean(axis=0)
    # epsilon = infinity (C infinite): classifier-free guidance, pub + g * mean shift.
    for g in (0.5, 1.0, 2.5):
        assert np.allclose(public_prior_scores(private, pub, math.inf, g), pub + g * shift)
    # A finite clip bounds every prompt's contribution whatever g: huge g gives C * mean sign.
    big = public_prior_scores(private, pub, 0.3, 1e6)
    assert np.allclose(big, pub + 0.3 * np.sign(private - pub).mean(axis=0))
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="guidance"):
            public_prior_scores(private, pub, 1.0, bad)


@pytest.mark.parametrize("alpha", [1.5, 2.0, 4.0, 16.0])
def test_renyi_divergence_within_the_bounded_range_zcdp_bound(alpha):
    """eta-bounded range implies eta^2/8-zCDP: D_alpha(P||P') <= alpha * eta^2 / 8 on random pairs."""
    rng = np.random.default_rng(int(alpha * 10))
    m, clip, tau = 5, 1.5, 1.0
    eta = public_prior_epsilon_per_token(clip, tau, m)
    rho = eta * eta / 8
    for _ in range(300):
        k = int(rng.integers(2, 30))
        pub = _random_logprobs(rng, k, 4.0)
        a = _random_logprobs(rng, (m, k), 4.0)
        b = a.copy()
        b[int(rng.integers(m))] = _random_logprobs(rng, k, 20.0)
        lp = log_softmax(public_prior_scores(a, pub, clip) / tau)
        lq = log_softmax(public_prior_scores(b, pub, clip) / tau)
        d = np.log(np.sum(np.exp(alpha * lp + (1 - alpha) * lq))) / (alpha - 1)
        assert d <= alpha * rho + 1e-9


def test_candidates_depend_on_public_inputs_only_and_hold_every_possible_winner():
    rng = np.random.default_rng(3)
    for _ in range(200):
        v, k, clip = int(rng.integers(20, 200)), int(rng.integers(1, 15)), float(rng.uniform(0.05, 3.0))
        pub = _random_logprobs(rng, v, 3.0)
        cand = top_k_plus(pub, k, clip)
        assert set(cand) >= set(np.argsort(-pub)[:k])  # the public top k
        kth = np.sort(pub)[-k]
        assert set(cand) >= set(np.flatnonzero(pub + clip >= kth))  # whatever can reach the public top k
        for _ in range(5):  # any private data: the aggregate's top k stays inside the set
            u = public_prior_scores(_random_logprobs(rng, (4, v), 10.0), pub, clip)
            assert set(np.argsort(-u)[:k]) <= set(cand)
    # The function sees no private input at all, and C = 0 gives exactly the public top k.
    pub = _random_logprobs(rng, 50, 2.0)
    assert list(top_k_plus(pub, 7, 0.0)) == list(np.argsort(-pub, kind="stable")[:7])
    assert len(top_k_plus(pub, None, 1.0)) == 50 and len(top_k_plus(pub, 7, math.inf)) == 50


def test_epsilon_zero_is_exactly_public_sampling_at_temperature_tau():
    pub = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    private = _random_logprobs(np.random.default_rng(0), (6, 4), 5.0)
    assert np.array_equal(public_prior_scores(private, pub, 0.0), pub)
    assert np.array_equal(public_prior_scores(None, pub, 1.0), pub)
    tau, n = 0.8, 8000
    noise = Noise(5)
    draws = [public_prior_sample(None, pub, 0.0, tau, noise)[0] for _ in range(n)]
    expected = n * np.exp(log_softmax(pub / tau))
    assert stats.chisquare(np.bincount(draws, minlength=4), expected).pvalue > 1e-3


@pytest.mark.parametrize("mode,k", [("resample", None), ("fixed", None), ("block", 4)])
@pytest.mark.parametrize("calibrate", ["clip", "temperature"])
def test_calibration_meets_the_target_and_the_event_is_the_exponential_one(mode, k, calibrate):
    kw = dict(clip=None, temperature=1.0) if calibrate == "clip" else dict(clip=1.0, temperature=None)
    config = GenerationConfig(mode=mode, block_tokens=k, mechanism="public_prior", num_subsets=8, shots_per_subset=2,
                              max_tokens=12, epsilon=2.0, **kw)
    plan = plan_demonstrations(config, {"a": 2}, {"a": 600.0}, 1e-5)
    lp = plan.labels["a"]
    assert lp.epsilon_per_token == public_prior_epsilon_per_token(lp.clip, lp.temperature, 8)
    eps = accounting.epsilon_of([lp.event], 1e-5)
    assert 2.0 * 0.97 < eps <= 2.0
    single = demonstration_event("block", lp.q, 12, epsilon_per_token=lp.epsilon_per_token,
                                 block_tokens=config.block_length)
    assert lp.demonstration_event(config) == single
    # Lower epsilon: smaller clip (or hotter sampling), i.e. closer to public sampling.
    low = plan_demonstrations(GenerationConfig(**{**config.__dict__, "epsilon": 0.5}), {"a": 2}, {"a": 600.0},
                              1e-5).labels["a"]
    if calibrate == "clip":
        assert low.clip < lp.clip and low.temperature == lp.temperature == 1.0
    else:
        assert low.temperature > lp.temperature and low.clip == lp.clip == 1.0


def test_config_rules_for_the_public_prior():
    with pytest.raises(ValueError, match="guidance applies"):
        GenerationConfig(mechanism="gaussian", guidance=2.0, epsilon=1.0).validate()
    with pytest.raises(ValueError, match="guidance must"):
        GenerationConfig(mechanism="public_prior", guidance=0.0).validate()
    # Guidance is post-processing inside the clip: the plan (and so the charge) does not change.
    plans = [plan_demonstrations(GenerationConfig(mechanism="public_prior", mode="fixed", epsilon=2.0, guidance=g),
                                 {"a": 1}, {"a": 500.0}, 1e-5).labels["a"] for g in (1.0, 3.0)]
    assert plans[0].clip == plans[1].clip and plans[0].event == plans[1].event
    with pytest.raises(ValueError, match="not sigma"):
        GenerationConfig(mechanism="public_prior", sigma=1.0).validate()
    with pytest.raises(ValueError, match="clip or temperature"):
        GenerationConfig(mechanism="public_prior", clip=None, temperature=None).validate()
    with pytest.raises(ValueError):
        GenerationConfig(mechanism="public_prior", clip=0.0).validate()
    explicit = GenerationConfig(mechanism="public_prior", clip=0.5, temperature=2.0, epsilon=None)
    explicit.validate()
    plan = plan_demonstrations(explicit, {"a": 1}, {"a": 500.0}, 1e-5)
    assert plan.labels["a"].epsilon_per_token == pytest.approx(4 * 0.5 / (10 * 2.0))
    inf = plan_demonstrations(GenerationConfig(mechanism="public_prior", epsilon=math.inf), {"a": 1}, {"a": 500.0}, 1e-5)
    assert math.isinf(inf.labels["a"].clip) and math.isinf(inf.epsilon())


@pytest.fixture(scope="module")
def source():
    from tests.tiny_model import tiny_source

    return tiny_source()


@pytest.mark.parametrize("mode,k", [("resample", None), ("fixed", None), ("block", 2)])
def test_generation_in_every_mode_and_the_first_candidates_do_not_see_private_data(source, monkeypatch, mode, k):
    from aggregation import fewshot

    seen = []
    real = fewshot._prior_candidates

    def spy(public, vocab, top_k, clip):
        out = real(public, vocab, top_k, clip)
        seen.append(list(out[0]))
        return out

    monkeypatch.setattr(fewshot, "_prior_candidates", spy)
    config = GenerationConfig(mode=mode, block_tokens=k, mechanism="public_prior", num_subsets=3, shots_per_subset=2,
                              max_tokens=4, top_k=10, epsilon=3.0, max_prompt_tokens=160)
    plan = plan_demonstrations(config, {"LOC": 1}, {"LOC": 60.0}, 1e-4)
    lp = plan.labels["LOC"]
    assert plan.epsilon() <= 3.0
    firsts = []
    for data in (POOL, [*POOL, Example("an unusual private record about " + "zebras " * 20, "LOC")]):
        seen.clear()
        demo = generate_demonstration(source, NEVER_STOP, data, "LOC", config, lp, Noise(9))
        assert demo.event == lp.demonstration_event(config) and 1 <= demo.tokens <= 4
        firsts.append(seen[0])
    assert firsts[0] == firsts[1] and len(firsts[0]) >= 10  # top-k+ of the public row: same on D and D'


def test_public_fallback_and_public_only_sample_the_public_prompt(source):
    config = GenerationConfig(mechanism="public_prior", public_only=True, max_tokens=3, top_k=10, temperature=1.0)
    lp = plan_demonstrations(config, {"LOC": 1}, {}, 0.5).labels["LOC"]
    runs = {tuple(generate_demonstration(source, NEVER_STOP, (), "LOC", config, lp, Noise(s)).token_ids)
            for s in range(6)}
    assert len(runs) > 1  # sampling, not greedy
    small = GenerationConfig(mechanism="public_prior", num_subsets=4, shots_per_subset=2, max_tokens=3, top_k=10)
    lp_small = plan_demonstrations(small, {"LOC": 1}, {"LOC": 3.0}, 1e-4).labels["LOC"]
    assert lp_small.decision == "public"
    a = generate_demonstration(source, NEVER_STOP, (), "LOC", small, lp_small, Noise(4)).token_ids
    b = generate_demonstration(source, NEVER_STOP, (), "LOC", config, lp, Noise(4)).token_ids
    assert a == b


@pytest.mark.slow
def test_real_smollm2_public_prior_block_mode_writes_a_question():
    from aggregation.datasets import TREC_PROMPT, load_trec
    from aggregation.fewshot import pools_by_label
    from aggregation.sources.local import LocalSource

    records = load_trec()
    pools = pools_by_label(records)
    config = GenerationConfig(mode="block", block_tokens=5, mechanism="public_prior", num_subsets=10,
                              shots_per_subset=2, max_tokens=15, epsilon=4.0)
    plan = plan_demonstrations(config, {"LOC": 1}, {k: float(len(v)) for k, v in pools.items()}, 1e-5)
    assert plan.epsilon() <= 4.0
    demo = generate_demonstration(LocalSource.from_pretrained(), TREC_PROMPT, pools["LOC"], "LOC", config,
                                  plan.labels["LOC"], Noise(0))
    assert len(demo.text.split()) >= 3, demo.text
    assert demo.text not in {r.text for r in records}
