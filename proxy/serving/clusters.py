"""Private clusters in serving (``generation.clusters: K``; issue 19, docs/privacy.md "Clusters").

A clustered task draws each demonstration of a label from one cluster of similar units of that
label. The privacy order, on top of :mod:`proxy.serving.warmup`'s:

1. The clustering of a label is released once per (dataset version, label, clustering settings,
   embedder[, public prompt and generator for ``public`` centroids]) and stored
   (:mod:`proxy.store.keyed_releases`): its events (:func:`aggregation.clusters.clustering_events`) are
   charged on the LABEL partition before any row is embedded; later warm-ups and other tasks
   reuse it for free. What is stored is DP output (or public): centroids and DP cluster sizes.
2. The set is planned from the stored DP sizes only: shots go one per usable cluster, largest
   noisy cluster first (:func:`aggregation.clusters.cluster_shots`); a label with fewer usable
   clusters than shots cycles through them again (those shots compose sequentially on their
   cluster's partition); a label with none follows the small-pool rule (public fallback or skip).
   Each shot is charged on partition ``label#j`` (label x cluster) before generation reads rows.
3. After the charge, a cluster's members are recomputed from the rows by the nearest-centroid
   rule (:func:`aggregation.clusters.assign`), which reads only each unit's own rows, so the
   clusters partition the units and demonstrations of different clusters compose in parallel.

Members, points and centroids never leave the process (views show cluster ids and DP sizes only).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import dp_accounting as dpa
import numpy as np

from aggregation.accounting import cluster_partition
from aggregation.calibration import CalibrationCache
from aggregation.clusters import ClusterConfig, Embed, assign, cluster_label, cluster_shots, clustering_events, \
    unit_points
from aggregation.mechanisms import Noise
from aggregation.planning import GenerationConfig, Plan, plan_demonstrations
from aggregation.prompts import Example, TaskPrompt
from aggregation.units import UnitPool, unit_pools
from proxy.budget import BudgetService
from proxy.task_config import TaskConfig
from proxy.store.base import DatasetMeta, Store

#: Identity of the embedder (part of a release's key): the offline MiniLM of aggregation.embeddings.
EMBEDDER_ID = "all-MiniLM-L6-v2"
#: ``public_texts(labels) -> {label: texts}``: epsilon-0 demonstrations (public centroids only).
PublicTexts = Callable[[Sequence[str]], Mapping[str, Sequence[str]]]

def embedder_problem() -> str | None:
    """Why this install cannot embed rows (one line, public), or None."""
    from aggregation.embeddings import MiniLMEmbedder

    problem = MiniLMEmbedder().unavailable()  # constructing it loads nothing
    return f"generation.clusters needs the offline sentence embedder: {problem}" if problem else None


def cluster_config(task: TaskConfig) -> ClusterConfig:
    """The task's public clustering parameters (library defaults for the mechanism's noise)."""
    return ClusterConfig(clusters=task.generation.clusters, method=task.generation.clustering)


def clustered(task: TaskConfig) -> bool:
    """Whether the task draws its demonstrations from private clusters."""
    return task.generation.clusters > 0 and not task.generation.public_only


def release_keys(task: TaskConfig, labels: Sequence[str], prompt: TaskPrompt, config: GenerationConfig,
                 generator_id: str) -> dict[str, str]:
    """``{label: key}`` of each label's release (public inputs only)."""
    cc = cluster_config(task)
    out = {}
    for label in labels:
        material: dict[str, Any] = {"label": label, "config": asdict(cc), "embedder": EMBEDDER_ID}
        if cc.method == "public":  # the centroids are the generator's epsilon-0 texts of this prompt
            material["public"] = {"generator": generator_id, "prompt": prompt.public_prompt(label),
                                  "max_tokens": config.max_tokens, "top_k": config.top_k}
        out[label] = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    return out


@dataclass(frozen=True)
class LabelClusters:
    """A label's stored release: centroids (DP or public) and DP cluster sizes. No members."""

    label: str
    centroids: np.ndarray
    noisy_sizes: list[float]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LabelClusters":
        return cls(str(d["label"]), np.asarray(d["centroids"], dtype=np.float64), [float(s) for s in d["noisy_sizes"]])


@dataclass(frozen=True)
class Part:
    """One planned partition of a clustered set: its label and cluster (None: the label's fallback)."""

    label: str
    cluster: int | None
    noisy_size: float | None


class ClusterReleases:
    """Releases, plans and member pools of clustered tasks (one clustering per label, charged once)."""

    def __init__(self, store: Store, budget: BudgetService):
        self.store = store
        self.budget = budget
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def stored(self, meta: DatasetMeta, keys: Mapping[str, str]) -> dict[str, LabelClusters | None]:
        """The stored release of each label (None where there is none yet)."""
        out: dict[str, LabelClusters | None] = {}
        for label, key in keys.items():
            raw = self.store.get_cluster_release(meta.id, key)
            out[label] = LabelClusters.from_dict(raw) if raw is not None else None
        return out

    @staticmethod
    def pending(task: TaskConfig, have: Mapping[str, LabelClusters | None]) -> list[tuple[str, dpa.DpEvent]]:
        """Charges of the releases still missing (each on its label's partition)."""
        events = clustering_events(cluster_config(task))
        return [(label, e) for label, r in have.items() if r is None for e in events]

    def release(self, task: TaskConfig, meta: DatasetMeta, keys: Mapping[str, str], embed: Embed,
                public_texts: PublicTexts, actor: str, reason: str) -> dict[str, LabelClusters]:
        """Each label's release: stored ones for free, missing ones charged, then computed and stored.

        The charge (:meth:`pending`) is recorded before the rows are loaded or embedded; the
        embedder is loaded and public centroid texts (no private data) are written before it, so
        an embedder or generator that fails costs nothing. Two processes racing may both pay; the first stored release wins.
        """
        cc = cluster_config(task)
        with self._locks_lock:
            lock = self._locks.setdefault(meta.id, threading.Lock())
        with lock:
            have = self.stored(meta, keys)
            missing = [label for label, r in have.items() if r is None]
            if not missing:
                return {label: r for label, r in have.items() if r is not None}
            embed(["a public text"])  # load the embedder now: one that cannot load costs nothing
            texts = public_texts(missing) if cc.method == "public" else {}
            self.budget.reserve(meta.id, self.pending(task, have), actor, reason, kind="clustering",
                                ref=f"{meta.id} K={cc.clusters} {cc.method}")
            rows = self.store.load_rows(meta.id, units=True)
            pools = unit_pools([Example(t, lab, unit=u) for t, lab, u in rows], meta.labels)
            del rows
            noise = Noise(None)  # CSPRNG
            for label in missing:
                rel = cluster_label(pools.get(label, UnitPool(label, ())), embed, cc, noise, texts.get(label, ()))
                kept = self.store.set_cluster_release(meta.id, keys[label], {
                    "label": label, "centroids": rel.centroids.tolist(), "noisy_sizes": rel.noisy_sizes,
                    "clusters": cc.clusters, "method": cc.method, "embedder": EMBEDDER_ID})
                have[label] = LabelClusters.from_dict(kept)
            del pools
            return {label: r for label, r in have.items() if r is not None}


def estimated(task: TaskConfig, meta: DatasetMeta, labels: Sequence[str]) -> dict[str, LabelClusters]:
    """Cluster sizes for pricing before a release exists: units spread evenly over the declared
    labels and the K clusters (admin-only estimate, like the warm-up's pool estimate)."""
    k = task.generation.clusters
    units = meta.units if meta.units is not None else meta.rows
    share = units / max(1, len(meta.labels)) / max(1, k)
    return {label: LabelClusters(label, np.zeros((0, 0)), [share] * k) for label in labels}


def plan_clusters(config: GenerationConfig, releases: Mapping[str, LabelClusters], labels: Sequence[str],
                  shots: int, delta: float, cache: CalibrationCache | None = None) -> tuple[Plan, dict[str, Part]]:
    """Plan ``shots`` demonstrations per label inside its clusters, from DP sizes only.

    The plan is keyed by partition (``label#j``; the label itself for a label with no usable
    cluster, which then follows the small-pool rule) and :class:`Part` says what each key is.
    """
    config.validate()
    plan, parts = Plan(config, delta), {}
    for label in labels:
        sizes = releases[label].noisy_sizes
        per = cluster_shots(sizes, shots, config.pool_threshold)
        if not per:
            sub = plan_demonstrations(config, {label: shots}, {}, delta, cache=cache)
            parts[label] = Part(label, None, None)
        else:
            keys = {cluster_partition(label, j): n for j, n in per.items()}
            sub = plan_demonstrations(config, keys, {cluster_partition(label, j): sizes[j] for j in per}, delta,
                                      cache=cache)
            parts.update({cluster_partition(label, j): Part(label, j, sizes[j]) for j in per})
        plan.labels.update(sub.labels)
    return plan, parts


def member_pools(pools: Mapping[str, UnitPool], releases: Mapping[str, LabelClusters],
                 parts: Mapping[str, Part], embed: Embed, config: ClusterConfig) -> dict[str, UnitPool]:
    """The private pool of every planned partition (call only after the plan was charged).

    A unit's cluster is its nearest centroid, computed from that unit's rows alone."""
    out: dict[str, UnitPool] = {}
    for label in dict.fromkeys(p.label for p in parts.values()):
        pool = pools.get(label, UnitPool(label, ()))
        wanted = {key: p.cluster for key, p in parts.items() if p.label == label}
        if all(j is None for j in wanted.values()):
            out.update({key: UnitPool(label, ()) for key in wanted})
            continue
        which = assign(unit_points(pool, embed, config), releases[label].centroids)
        for key, j in wanted.items():
            out[key] = UnitPool(label, tuple(u for u, c in zip(pool.units, which) if c == j))
    return out


def shown(parts: Mapping[str, Part], plan: Plan) -> dict[str, list[dict[str, Any]]]:
    """``{label: [{cluster, noisy_size, shots}]}`` of the planned clusters (DP sizes: public)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for key, p in parts.items():
        if p.cluster is not None:
            out.setdefault(p.label, []).append({"cluster": p.cluster, "noisy_size": _size(p.noisy_size),
                                                "shots": plan.labels[key].shots})
    return out


def _size(x: float | None) -> float | None:
    return None if x is None else round(float(x), 2)


def demo_fields(part: Part | None) -> dict[str, Any]:
    """What a stored demonstration says of its cluster (nothing for an unclustered one)."""
    if part is None or part.cluster is None:
        return {}
    return {"cluster": part.cluster, "cluster_size": _size(part.noisy_size)}
