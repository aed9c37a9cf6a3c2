"""Noise scales, sensitivity and the Poisson sampler."""

import math

import numpy as np
import pytest
from scipy import stats

from aggregation.mechanisms import (
    Noise,
    exponential_noisy_max,
    gaussian_report_noisy_max,
    gaussian_sensitivity,
    poisson_subsets,
    restrict_and_normalise,
    sampling_rate,
)


def _random_dists(rng, m, k):
    p = rng.random((m, k)) ** 3
    return p / p.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("m", [1, 2, 10, 50])
def test_changing_one_subset_moves_the_aggregate_by_at_most_sqrt2_over_m(m):
    rng = np.random.default_rng(m)
    worst = 0.0
    for _ in range(300):
        k = int(rng.integers(2, 40))
        p = _random_dists(rng, m, k)
        q = p.copy()
        i = int(rng.integers(m))
        # Adversarial neighbour: the changed subset's distribution becomes a point mass elsewhere.
        q[i] = 0.0
        q[i, int(np.argmin(p[i]))] = 1.0
        shift = np.linalg.norm(restrict_and_normalise(p).mean(0) - restrict_and_normalise(q).mean(0))
        worst = max(worst, shift)
        assert shift <= gaussian_sensitivity(m) + 1e-12
    # The bound is attained up to the chosen adversary: two disjoint point masses.
    p = np.zeros((m, 3)); p[:, 0] = 1
    q = p.copy(); q[0] = [0, 1, 0]
    assert np.linalg.norm(p.mean(0) - q.mean(0)) == pytest.approx(math.sqrt(2) / m)


def test_zero_rows_stay_within_sensitivity():
    p = np.zeros((4, 5))
    q = p.copy(); q[1, 2] = 0.7
    d = np.linalg.norm(restrict_and_normalise(p).mean(0) - restrict_and_normalise(q).mean(0))
    assert d <= gaussian_sensitivity(4)


@pytest.mark.parametrize("seed", [3, None])
def test_gaussian_noise_has_the_accounted_std(seed):
    m, k, sigma = 10, 2000, 0.7
    probs = np.full((m, k), 1.0 / k)
    _, noisy = gaussian_report_noisy_max(probs, sigma, Noise(seed))
    resid = noisy - 1.0 / k
    expected = sigma * math.sqrt(2) / m
    # Chi-square interval for the sample std of 2000 normal draws.
    assert abs(resid.mean()) < 4 * expected / math.sqrt(k)
    assert resid.std() == pytest.approx(expected, rel=0.08)
    assert stats.normaltest(resid).pvalue > 1e-4


def test_report_noisy_max_follows_the_aggregate_with_little_noise():
    probs = np.array([[0.1, 0.8, 0.1], [0.2, 0.6, 0.2]])
    assert gaussian_report_noisy_max(probs, 1e-6, Noise(1))[0] == 1
    assert exponential_noisy_max(probs, 1e6, Noise(1))[0] == 1


def test_exponential_mechanism_samples_proportionally_to_exp_eps_u_over_2():
    eps = 1.0
    probs = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # utilities [1, 1, 0]
    noise = Noise(11)
    counts = np.bincount([exponential_noisy_max(probs, eps, noise)[0] for _ in range(6000)], minlength=3)
    w = np.exp(eps * np.array([1.0, 1.0, 0.0]) / 2)
    expected = 6000 * w / w.sum()
    assert stats.chisquare(counts, expected).pvalue > 1e-3


def test_poisson_sampler_is_poisson_with_rate_q():
    n, q, m, trials = 2000, 0.01, 5, 400
    noise = Noise(1234)
    sizes, hits, assign = [], np.zeros(n), np.zeros(m)
    for _ in range(trials):
        subsets = poisson_subsets(n, q, m, noise)
        allidx = np.concatenate(subsets)
        assert len(set(allidx.tolist())) == len(allidx)  # disjoint subsets
        sizes.append(len(allidx))
        hits[allidx] += 1
        assign += [len(s) for s in subsets]
    sizes = np.array(sizes)
    # Total drawn ~ Binomial(n, q): mean and variance n q (1-q).
    assert sizes.mean() == pytest.approx(n * q, rel=0.05)
    assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.2)
    # Every record is included with the same probability q.
    assert hits.mean() / trials == pytest.approx(q, rel=0.05)
    # Records are assigned to subsets uniformly.
    assert stats.chisquare(assign).pvalue > 1e-3
    # Independence across records: per-record counts ~ Binomial(trials, q).
    observed = np.bincount(hits.astype(int), minlength=9)[:9].astype(float)
    observed[8] = (hits >= 8).sum()
    pmf = stats.binom(trials, q).pmf(np.arange(8))
    expected = n * np.append(pmf, 1 - pmf.sum())
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_unseeded_noise_is_not_reproducible_and_seeded_is():
    assert not np.array_equal(Noise(None).normal(1.0, 8), Noise(None).normal(1.0, 8))
    assert np.array_equal(Noise(5).normal(1.0, 8), Noise(5).normal(1.0, 8))
    u = Noise(None).uniform(20000)
    assert 0 <= u.min() and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-4
    g = Noise(None).gumbel(20000)
    assert g.mean() == pytest.approx(np.euler_gamma, abs=0.05)


def test_sampling_rate_validates_pool_size():
    assert sampling_rate(10, 2, 100) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        sampling_rate(10, 2, 19)
