"""Evaluation runs with private clusters (``dpicl eval --clusters K --clustering dp|public``).

One DP demonstration per label, drawn from the label's largest noisy cluster (a public rule on DP
counts: :func:`aggregation.clusters.usable_clusters`). Privacy flow, as in :mod:`.demos`: the
clustering's events are charged on every label partition before a row is embedded; the
demonstration's plan uses the cluster's DP size only and is charged on partition ``label#j``
before generation reads the cluster's rows. The label histogram is not released (the cluster
sizes set the sampling rates), so ``epsilon_total`` is the set plus the clustering events.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Mapping, Sequence

from aggregation import accounting
from aggregation.clusters import ClusterConfig, Embed, cluster_label, clustering_events, rows_pool, \
    usable_clusters
from aggregation.evaluation.demos import DemoSet, label_config, public_demonstrations
from aggregation.fewshot import GenerationConfig, LabelPlan, generate_demonstration, plan_demonstrations
from aggregation.mechanisms import Noise
from aggregation.prompts import Example, TaskPrompt
from aggregation.sources.base import NextTokenSource
from aggregation.units import UnitPool


def clustered_demonstrations(
    source: NextTokenSource,
    prompt: TaskPrompt,
    pools: Mapping[str, Sequence[Example]],
    labels: Sequence[str],
    config: GenerationConfig,
    clusters: ClusterConfig,
    embed: Embed,
    seed: int,
    delta: float,
    public_texts: Mapping[str, Sequence[str]] | None = None,
) -> DemoSet:
    """One DP demonstration per label from its largest noisy cluster (``config.epsilon`` per set)."""
    started = time.perf_counter()
    noise = Noise(seed)
    total, alone = accounting.PartitionedLedger(delta), accounting.PartitionedLedger(delta)
    for label in labels:  # spend before touching data: no row is embedded before this
        for event in clustering_events(clusters):
            total.add(label, event)
    chosen: dict[str, tuple[GenerationConfig, LabelPlan, UnitPool]] = {}
    missing: list[str] = []
    for label in labels:
        release = cluster_label(rows_pool(label, pools.get(label, ())), embed, clusters, noise,
                                (public_texts or {}).get(label, ()))
        order = usable_clusters(release.noisy_sizes, config.shots_per_subset)
        cfg = label_config(config, release.noisy_sizes[order[0]]) if order else None
        if cfg is None:  # not even one subset fits in the largest noisy cluster
            missing.append(label)
            continue
        key = accounting.cluster_partition(label, order[0])
        plan = plan_demonstrations(cfg, {key: 1}, {key: release.noisy_sizes[order[0]]}, delta).labels[key]
        total.add(key, plan.event)
        alone.add(key, plan.event)
        chosen[label] = (cfg, plan, release.members[order[0]])
    eps_set, eps_total = (alone.spent(), total.spent()) if config.private else (math.inf, math.inf)
    demos = []
    for label, (cfg, plan, members) in chosen.items():
        d = generate_demonstration(source, prompt, members, label, cfg, plan, noise)
        demos.append(Example(d.text, label))
    return DemoSet(demos, eps_set, eps_total, time.perf_counter() - started, missing)


def public_centroid_texts(source: NextTokenSource, prompt: TaskPrompt, labels: Sequence[str],
                          config: GenerationConfig, k: int, seed: int) -> dict[str, list[str]]:
    """``k`` epsilon-0 demonstrations per label (sampled from the public prompt: no private row read)."""
    cfg = replace(config, mechanism="public_prior", temperature=1.0, clip=None)
    texts: dict[str, list[str]] = {lab: [] for lab in labels}
    for j in range(k):
        for d in public_demonstrations(source, prompt, labels, cfg, seed=seed * 1000 + j).demos:
            texts[d.label].append(d.text)
    return texts
