"""Private Evolution for text (Aug-PE): DP synthetic text from inference calls only.

The model is never trained and never sees a private record. Per label ``y`` a population of ``S``
synthetic texts evolves for ``T`` iterations:

1. ``random_api(y, S)`` writes the first population (public prompt, no private data).
2. Each iteration embeds the population; every private record of ``y`` votes for its ``k`` nearest
   synthetic texts with weight ``1/sqrt(k)``; Gaussian noise is added to the vote histogram
   (:func:`noisy_histogram`, the only place noise is added); counts under a threshold are
   dropped; the population is resampled proportionally to the noisy counts and
   ``variation_api`` rewrites the resampled texts into the next population.

Privacy (add/remove one record, parallel composition over labels): one record of ``y`` adds or
removes ``k`` votes of weight ``1/sqrt(k)`` in ``y``'s histogram only, so the histogram's L2
sensitivity is ``sqrt(k * (1/sqrt(k))**2) = 1`` and ``N(0, sigma^2)`` noise per bin is a Gaussian
mechanism with noise multiplier ``sigma``. ``T`` iterations on the same pool compose to
``SelfComposed(Gaussian(sigma), T)`` on partition ``y``. Everything downstream (threshold,
resampling, variation, the final texts) is post-processing of noisy histograms.

Label proportions of the released dataset come from a DP label histogram (noisy counts, Gaussian
noise, sensitivity 1, charged on the whole-dataset partition ``"*"``), never from raw counts; the
reference implementation treated them as public.

Flow: :func:`plan_pe` fixes sigma and the charges from public inputs only, so a caller records them
in its ledger before :func:`run_pe` reads a private record.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import dp_accounting as dpa
import numpy as np

from aggregation import accounting
from aggregation.fewshot import COUNT_SIGMA, noisy_pool_sizes, pools_by_label
from aggregation.mechanisms import Noise
from aggregation.prompts import Example, TaskPrompt

#: ``random_api(label, n)`` -> ``n`` new texts of the task's kind for ``label`` (no private data).
RandomAPI = Callable[[str, int], list[str]]
#: ``variation_api(texts, label)`` -> one rewritten text per input text.
VariationAPI = Callable[[list[str], str], list[str]]
#: ``embed(texts)`` -> array ``[len(texts), dim]``.
Embed = Callable[[Sequence[str]], np.ndarray]
#: ``progress(fraction_done, current_step_description)``.
Progress = Callable[[float, str], None]
#: Returns True when the run should stop (checked between iterations).
ShouldCancel = Callable[[], bool]


class Cancelled(Exception):
    """Raised by a run when its cancellation callback returned True."""


@dataclass(frozen=True)
class PEConfig:
    """Parameters of a Private Evolution run (public)."""

    epsilon: float | None = 4.0  # target for the whole job, label histogram included
    sigma: float | None = None  # explicit histogram noise multiplier instead of a target
    iterations: int = 4  # T_pe
    population: int = 32  # S, synthetic texts per label during evolution
    num_samples: int = 120  # size of the released dataset, split by DP label proportions
    k: int = 1  # neighbours each private record votes for
    threshold: float | None = None  # noisy counts below this are dropped; None = 2 * sigma
    count_sigma: float = COUNT_SIGMA  # noise multiplier of the DP label histogram

    def validate(self) -> None:
        if self.iterations < 1:
            raise ValueError("iterations must be at least 1")
        if self.population < 1:
            raise ValueError("population must be at least 1")
        if self.num_samples < 1:
            raise ValueError("num_samples must be at least 1")
        if not 1 <= self.k <= self.population:
            raise ValueError("k must be between 1 and the population size")
        accounting.check_noise_or_target(self.sigma, self.epsilon, "sigma")
        if not self.count_sigma > 0:
            raise ValueError("count_sigma must be positive")


@dataclass
class PEPlan:
    """Noise and charges of a PE run, fixed before any private record is read."""

    config: PEConfig
    delta: float
    labels: list[str]
    sigma: float
    include_counts: bool  # whether the DP label histogram is charged by this plan

    @property
    def label_event(self) -> dpa.DpEvent:
        """Event of one label's evolution: ``T`` Gaussian histograms of multiplier ``sigma``."""
        return dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(self.sigma), self.config.iterations)

    @property
    def counts_event(self) -> dpa.DpEvent:
        """Event of the DP label histogram (one count per label, L2 sensitivity 1)."""
        return dpa.GaussianDpEvent(self.config.count_sigma)

    @property
    def threshold(self) -> float:
        return 2.0 * self.sigma if self.config.threshold is None else float(self.config.threshold)

    def charges(self) -> list[tuple[str, dpa.DpEvent]]:
        """``(partition, event)`` pairs to record before :func:`run_pe`."""
        out: list[tuple[str, dpa.DpEvent]] = [(label, self.label_event) for label in self.labels]
        if self.include_counts:
            out.append((accounting.WHOLE_DATASET, self.counts_event))
        return out

    def epsilon(self) -> float:
        """Epsilon of this plan's charges alone at ``delta``."""
        return accounting.PartitionedLedger(self.delta).epsilon_if_many(self.charges())

    def summary(self) -> dict:
        """JSON-able public parameters (for job records)."""
        return {"sigma": self.sigma, "iterations": self.config.iterations, "k": self.config.k,
                "threshold": self.threshold, "count_sigma": self.config.count_sigma,
                "labels": list(self.labels), "epsilon": self.epsilon()}


@dataclass
class PEResult:
    """Released synthetic rows and public statistics of the run."""

    rows: list[Example]
    label_counts: dict[str, float]  # the DP label histogram used for proportions
    per_label: dict[str, int] = field(default_factory=dict)
    iteration_seconds: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Planning (public inputs only).


def plan_pe(config: PEConfig, labels: Sequence[str], delta: float, include_counts: bool = True) -> PEPlan:
    """Calibrate ``sigma`` and fix the charges of a PE run over ``labels``.

    The target epsilon covers one label's ``T`` histograms composed with the DP label histogram
    (that histogram touches every partition). The histogram event is part of the calibration even
    when ``include_counts`` is False (the caller took counts released earlier): conservative, the
    run then costs less than its target, never more.
    """
    config.validate()
    if not labels:
        raise ValueError("no labels to synthesise")
    if config.sigma is not None:
        sigma = float(config.sigma)
    else:
        sigma = accounting.calibrate_after(
            dpa.GaussianDpEvent(config.count_sigma),
            lambda s: dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(s), config.iterations),
            float(config.epsilon), delta,
        )
    return PEPlan(config, delta, sorted(set(labels)), sigma, include_counts)


# ---------------------------------------------------------------------------------------------
# The noisy nearest-neighbour histogram: the only place PE adds noise.


def vote_histogram(private_emb: np.ndarray, synthetic_emb: np.ndarray, k: int) -> np.ndarray:
    """Each private row votes for its ``k`` nearest synthetic rows (L2) with weight ``1/sqrt(k)``.

    One private row contributes ``k`` distinct bins of ``1/sqrt(k)`` each, so adding or removing it
    moves the histogram by exactly 1 in L2 norm: the sensitivity the noise is calibrated for.
    """
    n_syn = synthetic_emb.shape[0]
    if not 1 <= k <= n_syn:
        raise ValueError("k must be between 1 and the number of synthetic samples")
    hist = np.zeros(n_syn, dtype=np.float64)
    if private_emb.shape[0] == 0:
        return hist
    a = np.asarray(private_emb, dtype=np.float64)
    b = np.asarray(synthetic_emb, dtype=np.float64)
    # Squared distances without the private rows' norms (constant per row, irrelevant to ranking).
    d = (b * b).sum(axis=1)[None, :] - 2.0 * a @ b.T
    nearest = np.argpartition(d, k - 1, axis=1)[:, :k] if k < n_syn else np.tile(np.arange(n_syn), (a.shape[0], 1))
    np.add.at(hist, nearest.ravel(), 1.0 / math.sqrt(k))
    return hist


def noisy_histogram(hist: np.ndarray, sigma: float, threshold: float, noise: Noise) -> np.ndarray:
    """``hist + N(0, sigma^2)`` per bin (sensitivity 1, so multiplier ``sigma``), then counts below
    ``threshold`` set to 0 (post-processing)."""
    noisy = np.asarray(hist, dtype=np.float64) + noise.normal(sigma, hist.shape[0])
    noisy[noisy < threshold] = 0.0
    return noisy


def resample(weights: np.ndarray, n: int, noise: Noise) -> np.ndarray:
    """``n`` indices drawn with replacement proportionally to ``weights`` (uniform if all zero)."""
    w = np.clip(np.asarray(weights, dtype=np.float64), 0.0, None)
    total = w.sum()
    if total <= 0:
        return noise.integers(len(w), n).astype(np.int64)
    cdf = np.cumsum(w) / total
    idx = np.searchsorted(cdf, noise.uniform(n), side="right")
    return np.minimum(idx, len(w) - 1).astype(np.int64)


def allocate(label_counts: Mapping[str, float], total: int) -> dict[str, int]:
    """Split ``total`` rows over labels proportionally to noisy counts (negatives count as 0),
    largest remainder; equal split if every count is non-positive."""
    labels = sorted(label_counts)
    w = np.array([max(0.0, float(label_counts[lab])) for lab in labels])
    if w.sum() <= 0:
        w = np.ones(len(labels))
    raw = total * w / w.sum()
    out = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - out))[: total - int(out.sum())]:
        out[i] += 1
    return {lab: int(n) for lab, n in zip(labels, out)}


# ---------------------------------------------------------------------------------------------
# The run.


def run_pe(
    plan: PEPlan,
    private: Sequence[Example],
    random_api: RandomAPI,
    variation_api: VariationAPI,
    embed: Embed,
    noise: Noise,
    label_counts: Mapping[str, float] | None = None,
    progress: Progress | None = None,
    should_cancel: ShouldCancel | None = None,
) -> PEResult:
    """Evolve per-label populations and release ``config.num_samples`` synthetic rows.

    Call only after ``plan.charges()`` were recorded. ``label_counts`` are DP label counts released
    earlier (then ``plan.include_counts`` is False); otherwise the plan's histogram is drawn here.
    Records whose label is not in ``plan.labels`` are ignored. Raises :class:`Cancelled`.
    """
    cfg = plan.config
    pools = pools_by_label(private)
    if label_counts is None:
        if not plan.include_counts:
            raise ValueError("the plan did not charge a label histogram; pass label_counts")
        exact = {lab: len(pools.get(lab, ())) for lab in plan.labels}
        label_counts, _ = noisy_pool_sizes(exact, noise, cfg.count_sigma)
    counts = {lab: float(label_counts.get(lab, 0.0)) for lab in plan.labels}
    sizes = allocate(counts, cfg.num_samples)
    work = [lab for lab in plan.labels if sizes[lab] > 0]
    total_steps = max(1, len(work) * cfg.iterations)
    result = PEResult(rows=[], label_counts=counts, per_label=dict(sizes))
    done = 0
    for label in work:
        if progress is not None:
            progress(done / total_steps, f"label {label}: embedding and initial population")
        pool = [ex.text for ex in pools.get(label, ())]
        priv_emb = embed(pool) if pool else np.zeros((0, 1))
        population = _check_texts(random_api(label, cfg.population), cfg.population, "random_api")
        for t in range(1, cfg.iterations + 1):
            if should_cancel is not None and should_cancel():
                raise Cancelled()
            started = time.perf_counter()
            syn_emb = embed(population)
            hist = vote_histogram(priv_emb, syn_emb, cfg.k) if pool else np.zeros(len(population))
            noisy = noisy_histogram(hist, plan.sigma, plan.threshold, noise)
            n_next = sizes[label] if t == cfg.iterations else cfg.population
            chosen = [population[i] for i in resample(noisy, n_next, noise)]
            population = _check_texts(variation_api(chosen, label), n_next, "variation_api")
            result.iteration_seconds.append(time.perf_counter() - started)
            done += 1
            if progress is not None:
                progress(done / total_steps, f"label {label}: iteration {t}/{cfg.iterations}")
        result.rows.extend(Example(text, label) for text in population)
    return result


def _check_texts(texts: Sequence[str], n: int, who: str) -> list[str]:
    texts = [" ".join(str(t).split()) for t in texts]
    if len(texts) != n:
        raise RuntimeError(f"{who} returned {len(texts)} texts instead of {n}")
    return texts


# ---------------------------------------------------------------------------------------------
# Prompt templates for RANDOM and VARIATION calls, derived from the task's fields.


def random_prompt(task: TaskPrompt, label: str) -> str:
    """Completion prompt for one new text of ``label`` (public: instruction and header only)."""
    return task.public_prompt(label)


def variation_prompt(task: TaskPrompt, text: str, label: str) -> str:
    """Completion prompt that writes a new text in the style of ``text`` (a synthetic sample,
    never a private one): the sample shown as a one-shot example, then the header for ``label``."""
    return task.generation_prompt([Example(text, label)], label)


def random_messages(task: TaskPrompt, label: str) -> list[dict]:
    """Chat form of :func:`random_prompt` for chat-only providers."""
    return [
        {"role": "system", "content": task.instruction},
        {"role": "user", "content": f"Write one new, varied example whose {task.label_prefix.rstrip(':').lower()} "
                                    f"is {task.word(label)}. Reply with the {task.input_prefix.rstrip(':').lower()} "
                                    "only, on one line."},
    ]


def variation_messages(task: TaskPrompt, text: str, label: str) -> list[dict]:
    """Chat form of :func:`variation_prompt`: rephrase a synthetic sample, keeping its label."""
    return [
        {"role": "system", "content": task.instruction},
        {"role": "user", "content": f"Rewrite this {task.input_prefix.rstrip(':').lower()} with different wording "
                                    f"and details, keeping its {task.label_prefix.rstrip(':').lower()} "
                                    f"({task.word(label)}). Reply with the rewrite only, on one line.\n\n{text}"},
    ]


def first_line(text: str) -> str:
    """The first non-empty line of a generation, whitespace-normalised."""
    for line in text.splitlines():
        if line.strip():
            return " ".join(line.split())
    return ""
