"""Where noise is added: sampling, noisy aggregation and the DpEvent each mechanism emits.

Everything a reviewer needs to check one mechanism sits here side by side:

* :func:`poisson_subsets` - the sampler the accountant assumes (Poisson with rate ``q``, then a
  uniform assignment of each drawn record to one of ``M`` subsets).
* :func:`gaussian_report_noisy_max` - Gaussian noise of std ``sigma * sqrt(2) / M`` on the mean of
  ``M`` probability vectors (L2 sensitivity ``sqrt(2)/M`` under add/remove of one record, because
  a record sits in at most one subset and so changes at most one vector), then argmax.
* :func:`exponential_noisy_max` - the exponential mechanism via the Gumbel-max trick.
* :func:`demonstration_event` - the DpEvent of one demonstration for each sampling mode and
  mechanism; the generator charges exactly this.
"""

from __future__ import annotations

import math
import os
from typing import Literal

import dp_accounting as dpa
import numpy as np

Mode = Literal["resample", "fixed"]
Mechanism = Literal["gaussian", "exponential"]


class Noise:
    """Randomness for sampling and noise.

    With ``seed=None`` (production) every draw comes from the operating system's CSPRNG
    (``os.urandom``), so noise cannot be predicted from an observed seed or generator state. With
    an integer seed it is a reproducible NumPy PCG64 stream (tests, benchmarks, evaluation).
    """

    def __init__(self, seed: int | None = None):
        self.seed = seed
        self._rng = np.random.default_rng(seed) if seed is not None else None

    @property
    def reproducible(self) -> bool:
        return self._rng is not None

    def uniform(self, size: int) -> np.ndarray:
        """Uniform floats in [0, 1) with 53 random bits each."""
        if self._rng is not None:
            return self._rng.random(size)
        raw = np.frombuffer(os.urandom(8 * size), dtype=np.uint64)
        return (raw >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))

    def integers(self, high: int, size: int) -> np.ndarray:
        """Uniform integers in [0, high)."""
        if self._rng is not None:
            return self._rng.integers(0, high, size)
        # Floor of a 53-bit uniform times ``high``: bias below 2**-40 for any realistic M.
        return np.minimum((self.uniform(size) * high).astype(np.int64), high - 1)

    def normal(self, scale: float, size: int) -> np.ndarray:
        """Gaussian N(0, scale^2) draws (Box-Muller on CSPRNG uniforms when unseeded)."""
        if self._rng is not None:
            return self._rng.normal(0.0, scale, size)
        n = (size + 1) // 2
        u1 = 1.0 - self.uniform(n)  # in (0, 1], so log is finite
        u2 = self.uniform(n)
        r = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:size]
        return scale * z

    def gumbel(self, size: int) -> np.ndarray:
        """Standard Gumbel draws."""
        if self._rng is not None:
            return self._rng.gumbel(0.0, 1.0, size)
        u = self.uniform(size)
        u = np.clip(u, 1e-300, 1.0 - 2.0**-53)
        return -np.log(-np.log(u))


# ---------------------------------------------------------------------------------------------
# Sampling.


def sampling_rate(num_subsets: int, shots_per_subset: int, pool_size: int) -> float:
    """Poisson rate ``q = M * N / n`` (expected M*N records drawn from a pool of n)."""
    if num_subsets < 1 or shots_per_subset < 1:
        raise ValueError("M and N must be at least 1")
    if pool_size < num_subsets * shots_per_subset:
        raise ValueError(
            f"pool of {pool_size} records is too small for M*N = {num_subsets * shots_per_subset}"
        )
    return num_subsets * shots_per_subset / pool_size


def poisson_subsets(pool_size: int, q: float, num_subsets: int, noise: Noise) -> list[np.ndarray]:
    """Poisson-sample record indices with rate ``q`` and split them uniformly into ``M`` subsets.

    Each record is drawn independently with probability ``q`` (this is the sampling that
    ``PoissonSampledDpEvent`` accounts for) and assigned to a uniformly random subset. Subsets have
    variable size and may be empty (an empty subset is a zero-shot prompt).
    """
    drawn = np.flatnonzero(noise.uniform(pool_size) < q)
    which = noise.integers(num_subsets, len(drawn))
    return [drawn[which == i] for i in range(num_subsets)]


# ---------------------------------------------------------------------------------------------
# Aggregation.


def restrict_and_normalise(probs: np.ndarray) -> np.ndarray:
    """Renormalise rows already restricted to the candidate set; all-zero rows stay zero.

    A zero row is still within L2 distance 1 of any probability vector, so sensitivity holds.
    """
    probs = np.asarray(probs, dtype=np.float64)
    totals = probs.sum(axis=1, keepdims=True)
    return np.divide(probs, totals, out=np.zeros_like(probs), where=totals > 0)


def gaussian_sensitivity(num_subsets: int) -> float:
    """L2 sensitivity of the mean of M probability vectors when one vector changes."""
    return math.sqrt(2.0) / num_subsets


def gaussian_report_noisy_max(probs: np.ndarray, sigma: float, noise: Noise) -> tuple[int, np.ndarray]:
    """Argmax of the mean distribution plus N(0, (sigma*sqrt(2)/M)^2) noise per candidate.

    ``probs`` is ``[M, K]``, each row a distribution over the K candidates. Returns the winning
    column and the noisy aggregate. ``sigma`` is the noise multiplier the accountant sees.
    """
    p = restrict_and_normalise(probs)
    m = p.shape[0]
    agg = p.mean(axis=0)
    noisy = agg + noise.normal(sigma * gaussian_sensitivity(m), agg.shape[0])
    return int(np.argmax(noisy)), noisy


def exponential_noisy_max(probs: np.ndarray, epsilon_per_token: float, noise: Noise) -> tuple[int, np.ndarray]:
    """Exponential mechanism over the candidates via Gumbel-max.

    Utility ``u(v) = sum_i p_i(v) / max p_i``: each term lies in [0, 1] and one record changes one
    term, so the sensitivity is 1. Sampling proportional to ``exp(eps * u / 2)`` (Gumbel noise of
    scale ``2 / eps`` on ``u``, then argmax) is ``eps``-DP.
    """
    p = restrict_and_normalise(probs)
    peaks = p.max(axis=1, keepdims=True)
    scaled = np.divide(p, peaks, out=np.zeros_like(p), where=peaks > 0)
    utility = scaled.sum(axis=0)
    noisy = utility + (2.0 / epsilon_per_token) * noise.gumbel(utility.shape[0])
    return int(np.argmax(noisy)), noisy


# ---------------------------------------------------------------------------------------------
# Accounting of one demonstration.


def _amplified_pure_epsilon(epsilon: float, q: float) -> float:
    """Pure-DP epsilon of an eps-DP mechanism run on a Poisson sample of rate q (add/remove)."""
    if epsilon > 1.0:  # same value, written so that exp() cannot overflow
        return epsilon + math.log(q + (1.0 - q) * math.exp(-epsilon))
    return math.log1p(q * math.expm1(epsilon))


def demonstration_event(
    mode: Mode,
    q: float,
    tokens: int,
    sigma: float | None = None,
    epsilon_per_token: float | None = None,
) -> dpa.DpEvent:
    """The DpEvent of one demonstration of at most ``tokens`` tokens.

    Gaussian mechanism:

    * ``resample``: a fresh Poisson sample per token ->
      ``SelfComposed(PoissonSampled(q, Gaussian(sigma)), T)``.
    * ``fixed``: one Poisson sample reused for all T tokens. T adaptive Gaussians of multiplier
      sigma on the same sample compose exactly into one Gaussian of multiplier ``sigma/sqrt(T)``
      -> ``PoissonSampled(q, Gaussian(sigma / sqrt(T)))``.

    Exponential mechanism (eps-DP per token, accounted as zCDP on the RDP accountant because
    dp-accounting's PLD accountant has no pure-DP event under add/remove): we take the smaller of
    two valid bounds: the bounded-range bound ``eps^2/8`` per token (Cesar and Rogers 2021, which
    ignores sampling; sampling cannot hurt) and ``eps'^2/2`` for the pure-DP epsilon ``eps'``
    amplified by Poisson sampling (Bun and Steinke 2016).

    The generator always charges the full ``T`` tokens: the stopping time depends on private data.
    """
    if tokens < 1:
        raise ValueError("tokens must be at least 1")
    if not 0 < q <= 1:
        raise ValueError("sampling rate q must be in (0, 1]")
    if sigma is not None:
        if sigma <= 0:
            raise ValueError("sigma must be positive")
        if mode == "resample":
            return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), tokens)
        if mode == "fixed":
            return dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma / math.sqrt(tokens)))
        raise ValueError(f"unknown mode {mode!r}")
    if epsilon_per_token is not None:
        e = epsilon_per_token
        if e <= 0:
            raise ValueError("epsilon per token must be positive")
        if mode == "resample":
            rho = tokens * min(e * e / 8.0, _amplified_pure_epsilon(e, q) ** 2 / 2.0)
        elif mode == "fixed":
            rho = min(tokens * e * e / 8.0, _amplified_pure_epsilon(tokens * e, q) ** 2 / 2.0)
        else:
            raise ValueError(f"unknown mode {mode!r}")
        return dpa.ZCDpEvent(rho)
    raise ValueError("give sigma (Gaussian) or epsilon_per_token (exponential)")
