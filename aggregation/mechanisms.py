"""Where noise is added: sampling, noisy aggregation and the DpEvent each mechanism emits.

Everything a reviewer needs to check one mechanism sits here side by side:

* :func:`poisson_subsets` - the sampler the accountant assumes (Poisson with rate ``q``, then a
  uniform assignment of each drawn record to one of ``M`` subsets); :func:`poisson_unit_subsets`
  the same over privacy units (one uniformly drawn row per sampled unit).
* :func:`gaussian_report_noisy_max` - Gaussian noise of std ``sigma * sqrt(2) / M`` on the mean of
  ``M`` probability vectors (L2 sensitivity ``sqrt(2)/M`` under add/remove of one record, because
  a record sits in at most one subset and so changes at most one vector), then argmax.
* :func:`exponential_noisy_max` - the exponential mechanism via the Gumbel-max trick.
* :func:`public_prior_sample` - the public-prior mechanism: private-minus-public log-probabilities
  (each scaled by the public guidance ``g``) clipped to ``[-C, C]``, averaged, added back to the
  public ones, sampled at temperature ``tau``
  over the candidate set :func:`top_k_plus` (public inputs only); an exponential mechanism whose
  per-token bound is :func:`public_prior_epsilon_per_token` = ``4C/(M tau)``.
* :func:`demonstration_event` - the DpEvent of one demonstration for each sampling mode and
  mechanism; the generator charges exactly this. Every mode is "one Poisson sample per block of
  ``k`` tokens" (:func:`block_length`): ``resample`` is ``k = 1``, ``fixed`` is ``k = T``.
"""

from __future__ import annotations

import math
import os
from typing import Literal, Sequence

import dp_accounting as dpa
import numpy as np

from aggregation.bounded_range import SampledBoundedRangeDpEvent

Mode = Literal["resample", "fixed", "block"]
Mechanism = Literal["gaussian", "exponential", "public_prior"]


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


def poisson_unit_subsets(unit_sizes: Sequence[int], q: float, num_subsets: int,
                         noise: Noise) -> list[list[tuple[int, int]]]:
    """Poisson-sample *units* with rate ``q``, take one row of each, split them into ``M`` subsets.

    ``unit_sizes[u]`` is the number of rows unit ``u`` holds in this pool. Each unit is drawn
    independently with probability ``q`` (the Poisson sampling ``PoissonSampledDpEvent`` assumes,
    now over units), then one of its rows uniformly at random, then a uniformly random subset.
    Returns ``(unit, row)`` pairs per subset: a unit contributes at most one row to one subset,
    however many rows it has. Rows-as-units (all sizes 1) is exactly :func:`poisson_subsets`.
    """
    sizes = np.asarray(unit_sizes, dtype=np.int64)
    if sizes.size and sizes.min() < 1:
        raise ValueError("every unit in a pool holds at least one row")
    drawn = np.flatnonzero(noise.uniform(len(sizes)) < q)
    which = noise.integers(num_subsets, len(drawn))
    # Floor of a 53-bit uniform times the unit's size: bias below 2**-40 for any realistic size.
    rows = np.minimum((noise.uniform(len(drawn)) * sizes[drawn]).astype(np.int64), sizes[drawn] - 1)
    return [[(int(u), int(r)) for u, r in zip(drawn[which == i], rows[which == i])] for i in range(num_subsets)]


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


def log_probs(probs: np.ndarray) -> np.ndarray:
    """Natural log of probabilities; 0 becomes -inf (no warning)."""
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(probs, dtype=np.float64))


def top_k_plus(public_logprobs: np.ndarray, k: int | None, clip: float) -> np.ndarray:
    """Candidate tokens of the public-prior mechanism, best public first; public inputs only.

    Every token whose public log-probability is within ``2C`` of the public k-th largest. The
    aggregate ``u(v) = pub(v) + shift(v)`` has ``shift(v)`` in ``[-C, C]``, so a token outside this
    set can never overtake the public top k (it would need ``pub(v) + C >= pub_k - C``): the set
    holds the top k of ``u`` whatever the private data. ``k=None`` (or ``k`` >= the number of
    tokens, or ``C`` infinite) keeps every token.
    """
    lp = np.asarray(public_logprobs, dtype=np.float64)
    if k is None or k >= lp.shape[0] or math.isinf(clip):
        idx = np.arange(lp.shape[0])
    else:
        kth = np.partition(lp, -k)[-k]
        idx = np.flatnonzero(lp >= kth - 2.0 * clip)
    return idx[np.argsort(-lp[idx], kind="stable")]


def public_prior_epsilon_per_token(clip: float, temperature: float, num_subsets: int) -> float:
    """Bounded-range width (hence pure epsilon) of one public-prior token: ``4C / (M tau)``.

    Adding or removing one record changes one subset's clipped shift, each coordinate staying in
    ``[-C, C]``: every coordinate of the mean moves by at most ``2C/M`` either way, so the change
    of ``u/tau`` spans an interval of width at most ``4C/(M tau)`` over the candidates.
    """
    if not clip >= 0 or not temperature > 0 or num_subsets < 1:
        raise ValueError("need clip >= 0, temperature > 0 and at least one subset")
    return 4.0 * clip / (num_subsets * temperature)


def public_prior_scores(private_logprobs: np.ndarray | None, public_logprobs: np.ndarray, clip: float,
                        guidance: float = 1.0) -> np.ndarray:
    """``pub + mean_i clip(g * (lp_i - pub), -C, C)`` over the candidates (``[M, K]`` and ``[K]``).

    ``g`` (guidance, a public constant) scales each prompt's own shift before it is clipped, as
    classifier-free guidance does: the shift away from the public prompt is what carries the
    private data, and the mean over M prompts dilutes it. Each prompt's clipped shift still lies in
    ``[-C, C]``, so :func:`public_prior_epsilon_per_token` holds for every ``g`` unchanged.
    ``None`` or ``C = 0``: the public log-probabilities alone. A token a private prompt gives
    probability 0 gets shift ``-C`` from that prompt (within the bound).
    """
    if not (guidance > 0 and math.isfinite(guidance)):
        raise ValueError("guidance must be a positive finite number")
    pub = np.asarray(public_logprobs, dtype=np.float64)
    if private_logprobs is None or clip == 0:
        return pub.copy()
    with np.errstate(invalid="ignore"):
        diff = np.asarray(private_logprobs, dtype=np.float64) - pub[None, :]
    diff = np.nan_to_num(diff, nan=0.0, posinf=math.inf, neginf=-math.inf) * guidance
    return pub + np.clip(diff, -clip, clip).mean(axis=0)


def public_prior_sample(private_logprobs: np.ndarray | None, public_logprobs: np.ndarray, clip: float,
                        temperature: float, noise: Noise, guidance: float = 1.0) -> tuple[int, np.ndarray]:
    """Sample a candidate with probability proportional to ``exp(u / tau)`` (Gumbel-max).

    ``u`` is :func:`public_prior_scores` (with ``guidance``). With ``private_logprobs=None``
    (epsilon 0) this is sampling from the public prompt at temperature ``tau`` over the
    candidates. Returns the winning column and the scores.
    """
    if not temperature > 0:
        raise ValueError("temperature must be positive")
    u = public_prior_scores(private_logprobs, public_logprobs, clip, guidance)
    noisy = u / temperature + noise.gumbel(u.shape[0])
    return int(np.argmax(noisy)), u


# ---------------------------------------------------------------------------------------------
# Accounting of one demonstration.


def block_length(mode: Mode, tokens: int, block_tokens: int | None = None) -> int:
    """Tokens generated from one Poisson sample: 1 (``resample``), T (``fixed``), min(k, T) (``block``)."""
    if tokens < 1:
        raise ValueError("tokens must be at least 1")
    if mode == "resample":
        return 1
    if mode == "fixed":
        return tokens
    if mode == "block":
        if block_tokens is None or block_tokens < 1:
            raise ValueError("block mode needs block_tokens >= 1")
        return min(int(block_tokens), tokens)
    raise ValueError(f"unknown mode {mode!r}")


def blocks_of(tokens: int, k: int) -> tuple[int, int]:
    """``(full, last)``: ``full`` blocks of ``k`` tokens, then one block of ``last`` tokens (0 = none).

    ``ceil(T/k)`` blocks in all; the last is shorter when ``k`` does not divide ``T``.
    """
    full, rest = divmod(tokens, k)
    return full, rest


def _compose(full: int, block: dpa.DpEvent, last: dpa.DpEvent | None) -> dpa.DpEvent:
    """``full`` independent copies of ``block``, then ``last``; a single block stays unwrapped."""
    head = block if full == 1 else dpa.SelfComposedDpEvent(block, full) if full > 1 else None
    if last is None:
        assert head is not None
        return head
    return last if head is None else dpa.ComposedDpEvent([head, last])


def demonstration_event(
    mode: Mode,
    q: float,
    tokens: int,
    sigma: float | None = None,
    epsilon_per_token: float | None = None,
    block_tokens: int | None = None,
) -> dpa.DpEvent:
    """The DpEvent of one demonstration of at most ``tokens`` tokens.

    The generator draws one Poisson sample (rate ``q``) per block of ``k`` consecutive tokens
    (:func:`block_length`) and keeps it for the whole block; blocks use independent samples.

    Gaussian mechanism: the ``L`` tokens of one block are ``L`` adaptive Gaussians of multiplier
    sigma on the same sample. They compose exactly into one Gaussian of multiplier
    ``sigma/sqrt(L)``, and Poisson sampling amplifies that whole block, so one block is
    ``PoissonSampled(q, Gaussian(sigma / sqrt(L)))``. The ``ceil(T/k)`` blocks compose; the last
    one has ``T - k*(ceil(T/k) - 1)`` tokens. Written as ``SelfComposed`` of the full blocks
    composed with the last block, which dp-accounting's PLD accountant composes exactly:

    * ``resample`` (k = 1): ``SelfComposed(PoissonSampled(q, Gaussian(sigma)), T)``;
    * ``fixed`` (k = T): ``PoissonSampled(q, Gaussian(sigma / sqrt(T)))``.

    Exponential and public-prior mechanisms (``eps``-bounded-range, hence ``eps``-DP, per token; for
    the public prior ``eps = 4C/(M tau)``): one block is
    ``SampledBoundedRangeDpEvent(q, eps, L)`` (:mod:`aggregation.bounded_range`), accounted by the
    PLD of its Poisson-amplified randomized-response pair and by its zCDP bound, the smaller
    epsilon of the composition reported. Blocks compose the same way as above.

    ``tokens`` is every token drawn from private rows (``T``, or ``P`` with ``private_tokens``), charged in
    full: the stopping time depends on private data.
    """
    k = block_length(mode, tokens, block_tokens)
    if not 0 < q <= 1:
        raise ValueError("sampling rate q must be in (0, 1]")
    full, last = blocks_of(tokens, k)
    if sigma is not None:
        if sigma <= 0:
            raise ValueError("sigma must be positive")

        def block(length: int) -> dpa.DpEvent:
            return dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma / math.sqrt(length)))

        return _compose(full, block(k), block(last) if last else None)
    if epsilon_per_token is not None:
        e = epsilon_per_token
        if e <= 0:
            raise ValueError("epsilon per token must be positive")
        if not math.isfinite(e):
            raise ValueError("epsilon per token must be finite")

        def br_block(length: int) -> dpa.DpEvent:
            return SampledBoundedRangeDpEvent(q, e, length)

        return _compose(full, br_block(k), br_block(last) if last else None)
    raise ValueError("give sigma (Gaussian) or epsilon_per_token (exponential)")
