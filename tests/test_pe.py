"""Private Evolution: histogram sensitivity and noise, calibration, and tiny end-to-end runs."""

from __future__ import annotations

import math
import random
import zlib

import dp_accounting as dpa
import numpy as np
import pytest

from aggregation import accounting
from aggregation.mechanisms import Noise
from aggregation.pe import (
    Cancelled,
    PEConfig,
    allocate,
    noisy_histogram,
    plan_pe,
    resample,
    run_pe,
    vote_histogram,
)
from aggregation.prompts import Example

WORDS_A = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"]
WORDS_B = ["engine", "wheel", "brake", "piston", "gear", "clutch", "axle", "valve"]


def bow_embed(texts, dim: int = 64) -> np.ndarray:
    """Deterministic hashed bag-of-words embedding, L2-normalised."""
    out = np.zeros((len(texts), dim))
    for i, t in enumerate(texts):
        for w in t.split():
            out[i, zlib.crc32(w.encode()) % dim] += 1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms > 0, norms, 1.0)


def word_apis(seed: int = 0):
    """RANDOM draws 3 words from both vocabularies; VARIATION swaps one word for a random one."""
    rng = random.Random(seed)
    vocab = WORDS_A + WORDS_B

    def random_api(label: str, n: int) -> list[str]:
        return [" ".join(rng.choice(vocab) for _ in range(3)) for _ in range(n)]

    def variation_api(texts: list[str], label: str) -> list[str]:
        out = []
        for t in texts:
            words = t.split()
            words[rng.randrange(len(words))] = rng.choice(vocab)
            out.append(" ".join(words))
        return out

    return random_api, variation_api


# -- the noisy histogram ----------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 7])
def test_one_record_moves_the_vote_histogram_by_exactly_one_in_l2(k):
    rng = np.random.default_rng(k)
    private = rng.normal(size=(50, 16))
    synthetic = rng.normal(size=(20, 16))
    full = vote_histogram(private, synthetic, k)
    for i in range(0, 50, 7):
        without = vote_histogram(np.delete(private, i, axis=0), synthetic, k)
        assert np.linalg.norm(full - without) == pytest.approx(1.0, abs=1e-12)
    # Total mass: each record spreads k votes of 1/sqrt(k).
    assert full.sum() == pytest.approx(50 * k / math.sqrt(k))


def test_votes_go_to_the_nearest_samples():
    synthetic = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    private = np.array([[0.1, 0.2], [9.0, 1.0], [9.5, -1.0]])
    assert vote_histogram(private, synthetic, 1).tolist() == [1.0, 2.0, 0.0]


def test_histogram_noise_has_the_accounted_std():
    sigma = 3.7
    noise = Noise(123)
    draws = np.concatenate([noisy_histogram(np.zeros(1000), sigma, -np.inf, noise) for _ in range(40)])
    assert draws.std() == pytest.approx(sigma, rel=0.02)
    assert abs(draws.mean()) < 0.05


def test_threshold_drops_low_counts():
    noisy = noisy_histogram(np.array([0.0, 100.0, 0.0]), 1.0, 10.0, Noise(0))
    assert noisy[0] == 0.0 and noisy[2] == 0.0 and noisy[1] > 90


def test_resample_follows_weights_and_falls_back_to_uniform():
    idx = resample(np.array([0.0, 3.0, 1.0]), 4000, Noise(1))
    counts = np.bincount(idx, minlength=3)
    assert counts[0] == 0 and counts[1] / 4000 == pytest.approx(0.75, abs=0.03)
    uniform = np.bincount(resample(np.zeros(4), 4000, Noise(2)), minlength=4)
    assert uniform.min() > 850


def test_allocate_sums_to_total_and_ignores_negative_counts():
    sizes = allocate({"a": 30.0, "b": 10.0, "c": -5.0}, 41)
    assert sum(sizes.values()) == 41 and sizes["c"] == 0 and sizes["a"] > sizes["b"]


# -- calibration --------------------------------------------------------------------------------


@pytest.mark.parametrize("target,iterations", [(1.0, 3), (4.0, 5), (8.0, 10)])
def test_calibrated_sigma_gives_epsilon_at_most_and_close_to_target(target, iterations):
    delta = 1e-5
    plan = plan_pe(PEConfig(epsilon=target, iterations=iterations), ["a", "b"], delta, include_counts=True)
    # What the job costs when composed as a ledger does (histogram on "*", T Gaussians per label).
    spent = plan.epsilon()
    assert spent <= target
    assert spent >= 0.97 * target
    # The event really is T Gaussians of the calibrated sigma per label partition.
    assert plan.label_event == dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(plan.sigma), iterations)
    parts = {p for p, _ in plan.charges()}
    assert parts == {"a", "b", accounting.WHOLE_DATASET}
    # A slightly smaller sigma would overspend: calibration is tight, not just safe.
    assert accounting.epsilon_of(
        [plan.counts_event, dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(plan.sigma * 0.97), iterations)],
        delta) > target


def test_plan_without_counts_costs_less_than_target():
    plan = plan_pe(PEConfig(epsilon=2.0, iterations=3), ["x"], 1e-5, include_counts=False)
    assert all(p == "x" for p, _ in plan.charges())
    assert plan.epsilon() < 2.0


def test_plan_rejects_bad_parameters():
    with pytest.raises(ValueError):
        plan_pe(PEConfig(epsilon=0.1), ["a"], 1e-5)  # below the label histogram's own cost
    with pytest.raises(ValueError):
        plan_pe(PEConfig(k=40, population=8), ["a"], 1e-5)


# -- end to end ---------------------------------------------------------------------------------


def _private(n_per_label: int = 60) -> list[Example]:
    rng = random.Random(5)
    rows = [Example(" ".join(rng.choice(WORDS_A) for _ in range(3)), "fruit") for _ in range(n_per_label)]
    rows += [Example(" ".join(rng.choice(WORDS_B) for _ in range(3)), "car") for _ in range(n_per_label // 2)]
    return rows


def _share(texts, words) -> float:
    toks = [w for t in texts for w in t.split()]
    return sum(w in words for w in toks) / max(1, len(toks))


def test_pe_run_moves_populations_towards_the_private_data():
    cfg = PEConfig(sigma=1.0, iterations=6, population=24, num_samples=60, k=1)
    plan = plan_pe(cfg, ["fruit", "car"], 1e-5)
    random_api, variation_api = word_apis(0)
    progress = []
    res = run_pe(plan, _private(), random_api, variation_api, bow_embed, Noise(7),
                 progress=lambda f, s: progress.append((f, s)))
    assert len(res.rows) == 60 == sum(res.per_label.values())
    # DP proportions: about two fruit rows per car row (counts 60 vs 30 plus N(0, 20^2) noise).
    assert res.per_label["fruit"] > res.per_label["car"] > 0
    fruit = [r.text for r in res.rows if r.label == "fruit"]
    car = [r.text for r in res.rows if r.label == "car"]
    # RANDOM draws both vocabularies equally; evolution pulls each label towards its pool.
    assert _share(fruit, WORDS_A) > 0.7
    assert _share(car, WORDS_B) > 0.7
    # One report per iteration plus one as each label starts.
    assert len(progress) == 14 and progress[-1][0] == pytest.approx(1.0)
    assert [f for f, _ in progress] == sorted(f for f, _ in progress)
    assert len(res.iteration_seconds) == 12


def test_pe_run_is_reproducible_with_a_seed():
    cfg = PEConfig(sigma=2.0, iterations=2, population=8, num_samples=10)
    plan = plan_pe(cfg, ["fruit", "car"], 1e-5)
    runs = []
    for _ in range(2):
        random_api, variation_api = word_apis(3)
        runs.append(run_pe(plan, _private(), random_api, variation_api, bow_embed, Noise(11)).rows)
    assert runs[0] == runs[1]


def test_pe_run_stops_when_cancelled():
    plan = plan_pe(PEConfig(sigma=1.0, iterations=5, population=8, num_samples=10), ["fruit", "car"], 1e-5)
    random_api, variation_api = word_apis(1)
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        run_pe(plan, _private(), random_api, variation_api, bow_embed, Noise(0), should_cancel=cancel)
    assert len(calls) == 3


def test_pe_run_with_external_counts_needs_no_counts_charge():
    plan = plan_pe(PEConfig(sigma=1.0, iterations=1, population=4, num_samples=9), ["fruit", "car"], 1e-5,
                   include_counts=False)
    random_api, variation_api = word_apis(2)
    with pytest.raises(ValueError):  # counts were not charged by the plan, so they must be given
        run_pe(plan, _private(), random_api, variation_api, bow_embed, Noise(0))
    res = run_pe(plan, _private(), random_api, variation_api, bow_embed, Noise(0),
                 label_counts={"fruit": 20.0, "car": 70.0})
    assert res.per_label == {"car": 7, "fruit": 2}


@pytest.mark.slow
def test_minilm_embeddings_rank_paraphrases_first():
    from aggregation.embeddings import MiniLMEmbedder

    emb = MiniLMEmbedder()(["Where is the Eiffel Tower?", "In which city is the Eiffel Tower located?",
                             "How many legs does a spider have?"])
    assert emb.shape == (3, 384)
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 2] + 0.2
