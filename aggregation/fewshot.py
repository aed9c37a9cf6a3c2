"""Token-by-token DP generation of few-shot demonstrations.

Privacy flow: :func:`plan_demonstrations` computes every DpEvent from public quantities only
(configuration and DP pool-size estimates), so a caller can charge its ledger *before*
:func:`generate_demonstration` reads a single private record. Noise, sampling and their accounting
live in :mod:`aggregation.mechanisms`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Sequence

import dp_accounting as dpa
import numpy as np

from aggregation import accounting
from aggregation.calibration import CalibrationCache, calibrate_noise
from aggregation.mechanisms import (
    Noise,
    block_length,
    demonstration_event,
    exponential_noisy_max,
    gaussian_report_noisy_max,
    poisson_subsets,
    poisson_unit_subsets,
)
from aggregation.prompts import Example, TaskPrompt
from aggregation.sources.base import NextTokenSource, Token
from aggregation.units import UnitPool

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
    mechanism: Literal["gaussian", "exponential"] = "gaussian"
    num_subsets: int = 10  # M
    shots_per_subset: int = 2  # N
    max_tokens: int = 20  # T
    top_k: int | None = 100  # K; None = full vocabulary (no reduced vocabulary)
    epsilon: float | None = 4.0  # target per demonstration set; math.inf = no noise
    sigma: float | None = None  # explicit noise multiplier instead of a target epsilon
    public_only: bool = False  # epsilon 0: public prompt only, no private data read
    #: Token budget of one prompt. Examples that do not fit are left out of that prompt (a function
    #: of its own subset only, so the sensitivity argument is unchanged). In ``fixed`` mode on a
    #: batched local model every row is padded to exactly this width, which lets the public prompt
    #: share the private rows' batch without its numerics depending on private prompt lengths.
    max_prompt_tokens: int = 256

    def validate(self) -> None:
        if self.mode not in ("resample", "fixed", "block"):
            raise ValueError("mode must be 'resample', 'fixed' or 'block'")
        if self.mode == "block" and (self.block_tokens is None or self.block_tokens < 1):
            raise ValueError("mode 'block' needs block_tokens >= 1")
        if self.mechanism not in ("gaussian", "exponential"):
            raise ValueError("mechanism must be 'gaussian' or 'exponential'")
        if self.num_subsets < 1 or self.shots_per_subset < 1:
            raise ValueError("num_subsets and shots_per_subset must be at least 1")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be at least 1 (or None for the full vocabulary)")
        if self.max_prompt_tokens < 16:
            raise ValueError("max_prompt_tokens must be at least 16")
        if self.public_only:
            return
        # epsilon 0 is spelled public_only; infinity means no noise
        accounting.check_noise_or_target(self.sigma, self.epsilon, "sigma", allow_infinite=True)

    @property
    def block_length(self) -> int:
        """Tokens generated from one Poisson sample (1 in resample mode, T in fixed mode)."""
        return block_length(self.mode, self.max_tokens, self.block_tokens)

    @property
    def private(self) -> bool:
        """Whether noise is added (false for public-only and epsilon = infinity)."""
        return not self.public_only and (self.sigma is not None or not math.isinf(self.epsilon or 0.0))


@dataclass
class LabelPlan:
    """What generating ``shots`` demonstrations for one label costs, fixed before data is read."""

    label: str
    shots: int
    q: float
    sigma: float | None  # Gaussian noise multiplier
    epsilon_per_token: float | None  # exponential mechanism
    event: dpa.DpEvent  # event of the whole label's demonstrations (composed over shots)

    def demonstration_event(self, config: GenerationConfig) -> dpa.DpEvent:
        """The event of a single demonstration."""
        return _single_event(config, self.q, self.sigma, self.epsilon_per_token)


@dataclass
class Plan:
    """Costs of a demonstration set: one :class:`LabelPlan` per label plus the epsilon."""

    config: GenerationConfig
    delta: float
    labels: dict[str, LabelPlan] = field(default_factory=dict)

    def charges(self) -> list[tuple[str, dpa.DpEvent]]:
        """``(partition, event)`` pairs to record in a ledger before generation."""
        return [(lp.label, lp.event) for lp in self.labels.values()]

    def epsilon(self) -> float:
        """Epsilon of this set alone at ``delta`` (max over labels: pools are disjoint)."""
        return accounting.PartitionedLedger(self.delta).epsilon_if_many(self.charges())


@dataclass
class Demonstration:
    """One generated demonstration with its cost and statistics."""

    text: str
    label: str
    token_ids: list[Token]
    event: dpa.DpEvent
    tokens: int
    model_calls: int
    seconds: float


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
    return demonstration_event("block", q, config.max_tokens, sigma=sigma, epsilon_per_token=ept,
                               block_tokens=config.block_length)


def plan_demonstrations(
    config: GenerationConfig,
    shots: Mapping[str, int],
    pool_sizes: Mapping[str, float],
    delta: float,
    cache: CalibrationCache | None = None,
) -> Plan:
    """Fix noise and events for ``shots[label]`` demonstrations per label from public inputs.

    ``pool_sizes`` must be public or DP estimates (see :func:`noisy_pool_sizes`). With a target
    epsilon, sigma is calibrated per label so that the label's demonstrations together cost at
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
        n_est = float(pool_sizes.get(label, 0.0))
        if not config.public_only and n_est < m_n:
            raise ValueError(
                f"the pool of label {label!r} is too small for M*N = {m_n} sampled records "
                f"(estimated size {max(0, round(n_est))}); lower num_subsets or shots_per_subset"
            )
        q = min(1.0, m_n / n_est) if n_est > 0 else 1.0
        sigma = ept = None
        if config.private:
            if config.mechanism == "gaussian":
                sigma = config.sigma if config.sigma is not None else calibrate_noise(
                    "gaussian", config.block_length, q, config.max_tokens, count, float(config.epsilon), delta, cache)
            else:
                ept = (1.0 / config.sigma) if config.sigma is not None else calibrate_noise(
                    "zcdp", config.block_length, q, config.max_tokens, count, float(config.epsilon), delta, cache)
        single = _single_event(config, q, sigma, ept)
        event = single if count == 1 else dpa.SelfComposedDpEvent(single, count)
        plan.labels[label] = LabelPlan(label, count, q, sigma, ept, event)
    return plan


# ---------------------------------------------------------------------------------------------
# Generation (reads private data; charge the plan first).


def generate_demonstration(
    source: NextTokenSource,
    prompt: TaskPrompt,
    pool: Sequence[Example] | UnitPool,
    label: str,
    config: GenerationConfig,
    label_plan: LabelPlan,
    noise: Noise,
    on_token: Callable[[int], None] | None = None,
) -> Demonstration:
    """Generate one demonstration for ``label`` from ``pool`` (that label's private records).

    ``pool`` is a list of rows (each row its own privacy unit) or a :class:`UnitPool` (Poisson
    sampling over units, one row of each sampled unit); ``label_plan.q`` must count the same.

    One Poisson sample per block of ``config.block_length`` tokens: at a block boundary the M
    private prompts are opened afresh (with the tokens generated so far as a suffix); within a
    block their decoding state (KV cache) is kept and advanced by one token per step.
    """
    started = time.perf_counter()
    calls = 0
    m = config.num_subsets
    k = config.block_length
    width = config.max_prompt_tokens
    vocab = source.vocabulary()
    if config.top_k is None and vocab is None:
        raise ValueError("this source cannot score the full vocabulary; set top_k")
    # The task instruction is public and opens every row: pass it as the shared prefix (tokenised
    # on its own; ``width`` counts it). Rows are the rest of each prompt.
    prefix = _shared_prefix(source, prompt, label)
    head = (source.count_tokens(prefix) or 0) if prefix else 0
    public_prompt = _body(prompt, (), label, prefix)
    if head + (source.count_tokens(public_prompt) or 0) > width:
        raise ValueError(f"the public prompt is longer than max_prompt_tokens = {width}")
    # On a batched, KV-cached backend the public prompt rides in row 0 of the private batch (one
    # forward per step instead of two). That is sound only because every row is padded to the
    # public width (``max_prompt_tokens`` plus the tokens generated so far): the batch shape then
    # carries nothing private.
    shared = not config.public_only and source.caches_state and config.top_k is not None

    def private_prompts() -> list[str]:
        return [_fit_prompt(source, prompt, rows, label, width, prefix, head)
                for rows in _draw_subsets(pool, label_plan.q, m, noise)]

    public = None
    if config.top_k and not shared:
        public = source.open([public_prompt], keep_state=True, prefix=prefix)
    private = None  # the current block's batch (with the public row first when shared)
    offset = 1 if shared else 0  # row of the first private prompt in ``private``
    left = 0  # tokens left in the current block

    generated: list[Token] = []
    text = ""
    for step in range(config.max_tokens):
        if not config.public_only and left == 0:
            # A block starts: a fresh Poisson sample and fresh prompts, padded to the public width.
            left = min(k, config.max_tokens - step)
            rows = [public_prompt, *private_prompts()] if shared else private_prompts()
            private = source.open(rows, suffix=generated, keep_state=left > 1, width=width + len(generated),
                                  prefix=prefix)
            if shared:
                public = private
        candidates = public.top_tokens(config.top_k) if public is not None else list(vocab)  # type: ignore[arg-type]
        if config.public_only:
            choice = 0  # top_tokens is sorted: greedy decoding of the public prompt
        else:
            assert private is not None
            probs = private.probs(candidates)[offset:]
            if label_plan.sigma is not None:
                choice, _ = gaussian_report_noisy_max(probs, label_plan.sigma, noise)
            elif label_plan.epsilon_per_token is not None:
                choice, _ = exponential_noisy_max(probs, label_plan.epsilon_per_token, noise)
            else:  # epsilon = infinity: no noise
                choice = int(np.argmax(probs.sum(axis=0)))
            left -= 1
        token = candidates[choice]
        if on_token is not None:
            on_token(step)
        if source.is_end(token):
            break
        generated.append(token)
        text = source.decode(generated)
        if prompt.stop in text:
            text = text.split(prompt.stop, 1)[0]
            break
        if step + 1 < config.max_tokens:
            if public is not None and not shared:
                public.advance(token)
            if private is not None and left > 0:
                private.advance(token)
        if private is not None and left == 0:  # the block is over: drop its private state
            calls += private.calls
            private = None
            if shared:
                public = None
    calls += (public.calls if public is not None and not shared else 0)
    calls += (private.calls if private is not None else 0)
    return Demonstration(
        text=text.strip(),
        label=label,
        token_ids=generated,
        event=label_plan.demonstration_event(config),
        tokens=len(generated),
        model_calls=calls,
        seconds=time.perf_counter() - started,
    )


def _draw_subsets(pool: Sequence[Example] | UnitPool, q: float, m: int, noise: Noise) -> list[list[Example]]:
    """One Poisson sample split into ``m`` subsets: over rows, or over units (one row per unit)."""
    if isinstance(pool, UnitPool):
        picks = poisson_unit_subsets(pool.sizes, q, m, noise)
        return [[pool.units[u][r] for u, r in subset] for subset in picks]
    return [[pool[i] for i in idx] for idx in poisson_subsets(len(pool), q, m, noise)]


def _shared_prefix(source: NextTokenSource, prompt: TaskPrompt, label: str) -> str:
    """The task's shared prefix, or ``""`` when tokenising it apart would change the tokens.

    Only public text decides: every row's split point is the end of the instruction followed by
    the blank line and the label header, the same characters as in the public prompt.
    """
    prefix = prompt.shared_prefix()
    if not prefix:
        return ""
    full, rest = prompt.public_prompt(label), prompt.public_body(label)
    encode = getattr(source, "encode", None)
    if callable(encode):
        same = list(encode(prefix)) + list(encode(rest)) == list(encode(full))
    else:
        counts = [source.count_tokens(x) for x in (prefix, rest, full)]
        same = None in counts or counts[0] + counts[1] == counts[2]  # type: ignore[operator]
    return prefix if same else ""


def _body(prompt: TaskPrompt, examples: Sequence[Example], label: str, prefix: str) -> str:
    """The row text: the prompt after the shared prefix (the whole prompt when there is none)."""
    return prompt.generation_body(examples, label) if prefix else prompt.generation_prompt(examples, label)


def _fit_prompt(source: NextTokenSource, prompt: TaskPrompt, examples: Sequence[Example], label: str,
                width: int, prefix: str = "", prefix_tokens: int = 0) -> str:
    """The row for ``examples``: as many of them (in order) as fit in ``width`` tokens, prefix included.

    Returns the text after ``prefix`` (the whole prompt when ``prefix`` is empty). Depends only on
    this subset's examples, so one record still changes at most one prompt.
    """
    room = width - prefix_tokens
    full = _body(prompt, examples, label, prefix)
    n = source.count_tokens(full)
    if n is None or n <= room:  # API backends cannot count: their prompts are not batched
        return full
    kept: list[Example] = []
    for ex in examples:
        if (source.count_tokens(_body(prompt, [*kept, ex], label, prefix)) or 0) <= room:
            kept.append(ex)
    return _body(prompt, kept, label, prefix)


def pools_by_label(records: Sequence[Example]) -> dict[str, list[Example]]:
    """Split records into disjoint per-label pools."""
    pools: dict[str, list[Example]] = {}
    for r in records:
        pools.setdefault(r.label, []).append(r)
    return pools
