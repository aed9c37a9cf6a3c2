"""The demonstration sets a run puts in front of the test queries: DP demonstrations (charged),
epsilon 0 (the public prompt alone) and one real example per label (the non-private upper bound).

Privacy flow for the DP sets, the same as the proxy's: the label histogram is released with
:func:`noisy_pool_sizes` (charged on the whole dataset), the demonstration plan is computed from
those noisy sizes only, every charge goes into a :class:`PartitionedLedger`, and only then are the
private pools read. A set records both the epsilon of the demonstrations alone (the nominal row
epsilon) and the epsilon including the pool-size release (``epsilon_total``).
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np

from aggregation import accounting
from aggregation.fewshot import GenerationConfig, LabelPlan, generate_demonstration, noisy_pool_sizes, \
    plan_demonstrations
from aggregation.mechanisms import Noise
from aggregation.prompts import Example, TaskPrompt
from aggregation.sources.base import NextTokenSource


@dataclass
class DemoSet:
    """Demonstrations for one run and what they cost."""

    demos: list[Example]
    epsilon: float  # the demonstration set alone
    epsilon_total: float  # including the pool-size release
    seconds: float = 0.0
    missing: list[str] = field(default_factory=list)  # labels without a demonstration


def label_config(config: GenerationConfig, noisy_size: float) -> GenerationConfig | None:
    """The config for a label whose DP pool-size estimate is ``noisy_size``.

    When the estimate is below ``M*N`` the number of subsets is lowered to fit (``None`` when not
    even one subset fits). The decision uses the DP estimate only, so it is post-processing and
    costs nothing extra.
    """
    need = config.num_subsets * config.shots_per_subset
    if config.public_only or noisy_size >= need:
        return config
    m = int(noisy_size // config.shots_per_subset)
    return replace(config, num_subsets=m) if m >= 1 else None


@dataclass
class ChargedPlan:
    """Per-label plans after all charges were recorded (nothing private read yet)."""

    configs: dict[str, GenerationConfig]
    plans: dict[str, LabelPlan]
    epsilon: float
    epsilon_total: float
    missing: list[str]


def charge_plan(
    config: GenerationConfig,
    counts: Mapping[str, int],
    shots: int,
    delta: float,
    noise: Noise,
) -> ChargedPlan:
    """Release noisy pool sizes, plan ``shots`` demonstrations per label, record every charge.

    ``counts`` are the exact pool sizes; they leave this function only through the Gaussian
    histogram of :func:`noisy_pool_sizes`.
    """
    noisy, count_event = noisy_pool_sizes(counts, noise)
    configs: dict[str, GenerationConfig] = {}
    plans: dict[str, LabelPlan] = {}
    missing: list[str] = []
    for label in counts:
        cfg = label_config(config, noisy[label])
        if cfg is None:
            missing.append(label)
            continue
        plan = plan_demonstrations(cfg, {label: shots}, noisy, delta)
        configs[label], plans[label] = cfg, plan.labels[label]
    if not config.private:
        eps_set = eps_total = math.inf
    else:
        total = accounting.PartitionedLedger(delta)
        alone = accounting.PartitionedLedger(delta)
        total.add(accounting.WHOLE_DATASET, count_event)
        for label, lp in plans.items():
            total.add(label, lp.event)
            alone.add(label, lp.event)
        eps_set, eps_total = alone.spent(), total.spent()
    return ChargedPlan(configs, plans, eps_set, eps_total, missing)


def dp_demonstrations(
    source: NextTokenSource,
    prompt: TaskPrompt,
    pools: Mapping[str, Sequence[Example]],
    labels: Sequence[str],
    config: GenerationConfig,
    seed: int,
    delta: float,
    progress: bool = False,
) -> DemoSet:
    """One DP demonstration per label (``config.epsilon`` per set; infinity = no noise)."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    noise = Noise(seed)
    charged = charge_plan(config, {lab: len(pools.get(lab, ())) for lab in labels}, 1, delta, noise)
    demos: list[Example] = []
    for label in tqdm(list(charged.plans), desc="generating", leave=False, disable=not progress):
        d = generate_demonstration(source, prompt, pools[label], label, charged.configs[label],
                                   charged.plans[label], noise)
        demos.append(Example(d.text, label))
    return DemoSet(demos, charged.epsilon, charged.epsilon_total, time.perf_counter() - started, charged.missing)


def public_demonstrations(
    source: NextTokenSource, prompt: TaskPrompt, labels: Sequence[str], config: GenerationConfig,
    progress: bool = False, seed: int = 0,
) -> DemoSet:
    """Epsilon 0: one demonstration per label from the public prompt alone (no private data).

    Greedy for the Gaussian and exponential mechanisms; the public-prior mechanism samples at its
    temperature (``seed`` seeds that draw).
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    cfg = replace(config, public_only=True)
    plan = plan_demonstrations(cfg, {lab: 1 for lab in labels}, {}, 0.5)
    noise = Noise(seed)
    demos = []
    for label in tqdm(list(labels), desc="generating (public)", leave=False, disable=not progress):
        d = generate_demonstration(source, prompt, (), label, cfg, plan.labels[label], noise)
        demos.append(Example(d.text, label))
    return DemoSet(demos, 0.0, 0.0, time.perf_counter() - started)


def real_demonstrations(pools: Mapping[str, Sequence[Example]], labels: Sequence[str], rng: np.random.Generator) -> DemoSet:
    """Non-private upper bound: one random real example per label."""
    demos = [pools[lab][int(rng.integers(len(pools[lab])))] for lab in labels if pools.get(lab)]
    return DemoSet(demos, math.inf, math.inf, 0.0, [lab for lab in labels if not pools.get(lab)])


def ordered(demos: Sequence[Example], order: Sequence[str]) -> list[Example]:
    """``demos`` sorted by their label's place in ``order``."""
    rank = {lab: i for i, lab in enumerate(order)}
    return sorted(demos, key=lambda d: rank.get(d.label, len(rank)))


def noise_seed(seed: int, *parts: float | str) -> int:
    """A reproducible seed per (seed, row parameters); distinct runs get independent noise."""
    words = [int(seed)] + [zlib.crc32(p.encode()) if isinstance(p, str) else int(min(p, 1e9) * 1000) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1)[0])
