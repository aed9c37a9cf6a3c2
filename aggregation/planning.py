"""Planning DP demonstrations from public quantities only.

:func:`plan_demonstrations` fixes every label's decision, noise and DpEvent from configuration and
DP pool-size estimates, so a caller can charge its ledger *before* any private record is read
(:func:`aggregation.fewshot.generate_demonstration` then reads them). Noise, sampling and their
accounting live in :mod:`aggregation.mechanisms`; calibration in :mod:`aggregation.calibration`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping

import dp_accounting as dpa

from aggregation import accounting
from aggregation.calibration import CalibrationCache, calibrate_noise
from aggregation.mechanisms import Noise, block_length, demonstration_event, public_prior_epsilon_per_token

#: Noise multiplier of the DP label histogram that sets each pool's sampling rate. One record
#: changes one count by 1 (L2 sensitivity 1). With 20, counts are off by ~20 records, which only
#: nudges q, and the event adds little epsilon once composed with the demonstrations' events.
COUNT_SIGMA = 20.0


@dataclass(frozen=True)
class GenerationConfig:
    """Parameters of DP demonstration generation (DESIGN.md section 3 notation)."""

    #: ``resample``: a fresh Poisson sample every token; ``fixed``: one per demonstration;
    #: ``block``: one per block of ``block_tokens`` tokens (the M prompts' KV caches are kept
    #: within a block). ``block`` with k = 1 is ``resample``, with k = T it is ``fixed``.
    mode: Literal["resample", "fixed", "block"] = "resample"
    block_tokens: int | None = None  # k, for mode "block"
    #: The library default stays ``gaussian`` (the mechanism that takes ``sigma``); tasks, ``dpicl
    #: generate`` and ``dpicl eval`` default to ``public_prior`` (docs/evaluation.md says why).
    mechanism: Literal["gaussian", "exponential", "public_prior"] = "gaussian"
    num_subsets: int = 10  # M
    shots_per_subset: int = 2  # N
    max_tokens: int = 20  # T
    #: P: only the first P tokens are drawn from the private mechanism (and accounted); the rest,
    #: up to T, are decoded from the public prompt alone after the private prefix (post-processing,
    #: epsilon 0). None = all T tokens are private. The budget of T tokens then buys P stronger ones.
    private_tokens: int | None = None
    top_k: int | None = 100  # K; None = full vocabulary (no reduced vocabulary)
    epsilon: float | None = 4.0  # target per demonstration set; math.inf = no noise
    sigma: float | None = None  # explicit noise multiplier instead of a target epsilon
    #: Public-prior mechanism: clip ``C`` of private-minus-public log-probabilities and sampling
    #: temperature ``tau``. Give both for explicit noise; leave one ``None`` to calibrate it for
    #: ``epsilon`` (default: ``tau = 1`` fixed, ``C`` calibrated, so lower epsilon means a smaller
    #: clip and text closer to public sampling, never flatter sampling).
    clip: float | None = None
    temperature: float | None = 1.0
    #: Public-prior mechanism: guidance ``g`` scales each prompt's private-minus-public shift
    #: before the clip (classifier-free guidance); the per-token bound ``4C/(M tau)`` is unchanged.
    guidance: float = 1.0
    #: Public-prior mechanism: temperature of the tokens decoded from the public prompt alone (after
    #: the private prefix, every token of an epsilon-0 demonstration). They read no private row, so
    #: this is free of the accounting that ties ``tau`` to ``C``; None = ``temperature``.
    public_temperature: float | None = None
    public_only: bool = False  # epsilon 0: public prompt only, no private data read
    #: Token budget of one prompt. Examples that do not fit are left out of that prompt (a function
    #: of its own subset only, so the sensitivity argument is unchanged). In ``fixed`` mode on a
    #: batched local model every row is padded to exactly this width, which lets the public prompt
    #: share the private rows' batch without its numerics depending on private prompt lengths.
    max_prompt_tokens: int = 256
    #: What a label whose DP pool estimate is below ``min_pool`` gets: ``"public"`` - an epsilon-0
    #: demonstration from the public prompt (no private row read), ``"skip"`` - none.
    small_pool: Literal["public", "skip"] = "public"
    #: Public threshold on the noisy pool size for generating from private data; default M*N
    #: (the sampling rate ``q = M*N/n`` must not exceed 1).
    min_pool: float | None = None

    def validate(self) -> None:
        if self.mode not in ("resample", "fixed", "block"):
            raise ValueError("mode must be 'resample', 'fixed' or 'block'")
        if self.mode == "block" and (self.block_tokens is None or self.block_tokens < 1):
            raise ValueError("mode 'block' needs block_tokens >= 1")
        if self.mechanism not in ("gaussian", "exponential", "public_prior"):
            raise ValueError("mechanism must be 'gaussian', 'exponential' or 'public_prior'")
        if self.clip is not None and not self.clip > 0:
            raise ValueError("clip must be positive (epsilon 0 is spelled public_only)")
        if self.temperature is not None and not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError("temperature must be a positive finite number")
        if not (self.guidance > 0 and math.isfinite(self.guidance)):
            raise ValueError("guidance must be a positive finite number")
        if self.public_temperature is not None:
            if not (self.public_temperature > 0 and math.isfinite(self.public_temperature)):
                raise ValueError("public_temperature must be a positive finite number")
            if self.mechanism != "public_prior":
                raise ValueError("public_temperature applies to the public_prior mechanism only")
        if self.mechanism != "public_prior" and self.guidance != 1.0:
            raise ValueError("guidance applies to the public_prior mechanism only")
        if self.mechanism == "public_prior" and self.sigma is not None:
            raise ValueError("the public-prior mechanism takes clip and temperature, not sigma")
        if self.num_subsets < 1 or self.shots_per_subset < 1:
            raise ValueError("num_subsets and shots_per_subset must be at least 1")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.private_tokens is not None and self.private_tokens < 1:
            raise ValueError("private_tokens must be at least 1 (or None: every token is private)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be at least 1 (or None for the full vocabulary)")
        if self.max_prompt_tokens < 16:
            raise ValueError("max_prompt_tokens must be at least 16")
        if self.small_pool not in ("public", "skip"):
            raise ValueError("small_pool must be 'public' or 'skip'")
        if self.min_pool is not None and not self.min_pool >= self.num_subsets * self.shots_per_subset:
            raise ValueError("min_pool must be at least M*N (num_subsets * shots_per_subset)")
        if self.public_only:
            return
        if self.mechanism == "public_prior":
            if self.clip is None and self.temperature is None:
                raise ValueError("the public-prior mechanism needs clip or temperature (calibrating the other)")
            if self.explicit_noise:
                return
            accounting.check_noise_or_target(None, self.epsilon, "clip", allow_infinite=True)
            return
        # epsilon 0 is spelled public_only; infinity means no noise
        accounting.check_noise_or_target(self.sigma, self.epsilon, "sigma", allow_infinite=True)

    @property
    def private_steps(self) -> int:
        """Tokens drawn from the private mechanism: min(P, T), or T when P is not set."""
        return self.max_tokens if self.private_tokens is None else min(self.private_tokens, self.max_tokens)

    @property
    def block_length(self) -> int:
        """Tokens generated from one Poisson sample (1 in resample mode, the private tokens in fixed mode)."""
        return block_length(self.mode, self.private_steps, self.block_tokens)

    @property
    def pool_threshold(self) -> float:
        """Smallest noisy pool size that is generated from private data."""
        return float(self.min_pool) if self.min_pool is not None else float(self.num_subsets * self.shots_per_subset)

    @property
    def explicit_noise(self) -> bool:
        """Whether the noise is given (sigma, or clip and temperature) rather than calibrated."""
        if self.mechanism == "public_prior":
            return self.clip is not None and self.temperature is not None
        return self.sigma is not None

    @property
    def private(self) -> bool:
        """Whether noise is added (false for public-only and epsilon = infinity)."""
        return not self.public_only and (self.explicit_noise or not math.isinf(self.epsilon or 0.0))


#: What a label gets: ``private`` - generated from its private pool; ``public`` - an epsilon-0
#: demonstration from the public prompt (public-only configuration, or a small pool);
#: ``skip`` - no demonstration.
Decision = Literal["private", "public", "skip"]


@dataclass
class LabelPlan:
    """What generating ``shots`` demonstrations for one label costs, fixed before data is read."""

    label: str
    shots: int
    q: float
    sigma: float | None  # Gaussian noise multiplier
    epsilon_per_token: float | None  # exponential and public-prior mechanisms (the event's parameter)
    event: dpa.DpEvent  # event of the whole label's demonstrations (composed over shots)
    decision: Decision = "private"
    #: Which rule decided, in words built from public settings and the DP pool estimate only.
    rule: str = ""
    clip: float | None = None  # public prior: C (math.inf at epsilon = infinity)
    temperature: float | None = None  # public prior: tau

    def demonstration_event(self, config: GenerationConfig) -> dpa.DpEvent:
        """The event of a single demonstration."""
        if self.decision != "private":
            return dpa.NoOpDpEvent()
        return _single_event(config, self.q, self.sigma, self.epsilon_per_token)


@dataclass
class Plan:
    """Costs of a demonstration set: one :class:`LabelPlan` per label plus the epsilon."""

    config: GenerationConfig
    delta: float
    labels: dict[str, LabelPlan] = field(default_factory=dict)

    def charges(self) -> list[tuple[str, dpa.DpEvent]]:
        """``(partition, event)`` pairs to record in a ledger before generation.

        One per planned label, whatever its decision (a fallback or skipped label records a
        ``NoOpDpEvent``), so the partitions written depend on the label set only.
        """
        return [(lp.label, lp.event) for lp in self.labels.values()]

    def to_generate(self) -> list[str]:
        """Labels that get demonstrations (private or public fallback), in plan order."""
        return [lab for lab, lp in self.labels.items() if lp.decision != "skip"]

    def decisions(self) -> dict[str, tuple[str, str]]:
        """``{label: (decision, rule)}`` for reporting which rule applied to each label."""
        return {lab: (lp.decision, lp.rule) for lab, lp in self.labels.items()}

    def epsilon(self) -> float:
        """Epsilon of this set alone at ``delta`` (max over labels: pools are disjoint)."""
        return accounting.PartitionedLedger(self.delta).epsilon_if_many(self.charges())


# ---------------------------------------------------------------------------------------------
# Planning (public quantities only).


def noisy_pool_sizes(counts: Mapping[str, int], noise: Noise, sigma: float = COUNT_SIGMA) -> tuple[dict[str, float], dpa.DpEvent]:
    """DP estimate of each label's pool size, and its event (charge it on the whole dataset).

    The sampling rate ``q = M*N/n_y`` must not depend on exact private counts, or the released
    demonstrations would depend on them outside the accounting. Gaussian noise of std ``sigma`` on
    the label histogram (L2 sensitivity 1 under add/remove) makes ``q`` a post-processing of a DP
    release.
    """
    labels = sorted(counts)
    draws = noise.normal(sigma, len(labels))
    noisy = {lab: float(counts[lab]) + float(z) for lab, z in zip(labels, draws)}
    return noisy, dpa.GaussianDpEvent(sigma)


def _single_event(config: GenerationConfig, q: float, sigma: float | None, ept: float | None) -> dpa.DpEvent:
    if config.public_only:
        return dpa.NoOpDpEvent()
    if not config.private:
        return dpa.NonPrivateDpEvent()
    return demonstration_event("block", q, config.private_steps, sigma=sigma, epsilon_per_token=ept,
                               block_tokens=config.block_length)


def plan_demonstrations(
    config: GenerationConfig,
    shots: Mapping[str, int],
    pool_sizes: Mapping[str, float],
    delta: float,
    cache: CalibrationCache | None = None,
) -> Plan:
    """Fix noise and events for ``shots[label]`` demonstrations per label from public inputs.

    ``pool_sizes`` must be public or DP estimates (see :func:`noisy_pool_sizes`). Each label's
    decision (private / public fallback / skip) follows :func:`decide`. With a target epsilon,
    sigma is calibrated per generated label so that the label's demonstrations together cost at
    most the target; the set then costs at most the target too (labels are disjoint).
    Calibrations are looked up in ``cache`` (default: an in-process LRU, see
    :mod:`aggregation.calibration`) under their public inputs.
    """
    config.validate()
    plan = Plan(config, delta)
    m_n = config.num_subsets * config.shots_per_subset
    for label, count in shots.items():
        if count < 1:
            continue
        if config.public_only:
            plan.labels[label] = LabelPlan(label, count, 1.0, None, None, dpa.NoOpDpEvent(), "public",
                                           "public_only: epsilon 0, public prompt only")
            continue
        decision, rule = decide(config, pool_sizes.get(label))
        if decision != "private":
            plan.labels[label] = LabelPlan(label, count, 1.0, None, None, dpa.NoOpDpEvent(), decision, rule)
            continue
        q = m_n / float(pool_sizes[label])  # <= 1: the estimate is at least the threshold >= M*N
        sigma = ept = clip = temperature = None
        if config.mechanism == "public_prior":
            clip, temperature = config.clip, config.temperature
            if not config.private:  # epsilon = infinity: no clipping
                clip, temperature = math.inf, temperature or 1.0
        if config.private:
            def calibrated(family: str) -> float:
                return calibrate_noise(family, config.block_length, q, config.private_steps, count,  # type: ignore[arg-type]
                                       float(config.epsilon), delta, cache)

            if config.mechanism == "gaussian":
                sigma = config.sigma if config.sigma is not None else calibrated("gaussian")
            elif config.mechanism == "exponential":
                ept = (1.0 / config.sigma) if config.sigma is not None else calibrated("bounded_range")
            else:
                clip, temperature, ept = _public_prior_noise(config, calibrated)
        single = _single_event(config, q, sigma, ept)
        event = single if count == 1 else dpa.SelfComposedDpEvent(single, count)
        plan.labels[label] = LabelPlan(label, count, q, sigma, ept, event, "private", rule, clip, temperature)
    return plan


def _public_prior_noise(config: GenerationConfig, calibrated: Callable[[str], float]) -> tuple[float, float, float]:
    """``(C, tau, eps per token)`` of the public-prior mechanism: given, or one of C / tau calibrated.

    The event depends on ``eps = 4C/(M tau)`` only, so the calibration (and its cache entry) is
    the exponential mechanism's; C or tau follows from it.
    """
    m = config.num_subsets
    if config.explicit_noise:
        c, tau = float(config.clip), float(config.temperature)  # type: ignore[arg-type]
        return c, tau, public_prior_epsilon_per_token(c, tau, m)
    e = calibrated("bounded_range")
    if config.clip is None:
        tau = float(config.temperature)  # type: ignore[arg-type]
        c = e * m * tau / 4.0
    else:
        c = float(config.clip)
        tau = 4.0 * c / (m * e)
    # The event records the per-token bound of the (C, tau) the generator uses; nudge by ulps so
    # that it never exceeds the calibrated value (epsilon is monotone in it).
    while public_prior_epsilon_per_token(c, tau, m) > e:
        c, tau = (math.nextafter(c, 0.0), tau) if config.clip is None else (c, math.nextafter(tau, math.inf))
    return c, tau, public_prior_epsilon_per_token(c, tau, m)


def decide(config: GenerationConfig, noisy_size: float | None) -> tuple[Decision, str]:
    """Generate from private data, fall back to the public prompt, or skip; and the rule's words.

    Depends only on the DP pool-size estimate (``None``: no estimate, e.g. a label of the domain
    absent from the release) and public settings, so the decision is post-processing of the DP
    histogram. It never fails: no single row can turn a plan into an error.
    """
    threshold = config.pool_threshold
    if noisy_size is not None and math.isfinite(noisy_size) and noisy_size >= threshold:
        return "private", f"noisy pool size >= {threshold:g}: generated from private data"
    action = "public fallback (epsilon 0)" if config.small_pool == "public" else "skipped"
    return config.small_pool, f"noisy pool size below {threshold:g}: {action}"
