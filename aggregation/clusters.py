"""Private clusters inside each label partition (issue 19, after Amin et al. 2025, arXiv 2506.04566).

A demonstration drawn from one cluster of similar units agrees more on the next token than one
drawn from the whole label, so the same noise costs less. The privacy contract (docs/privacy.md,
"Clusters"):

* A unit's point is the normalised mean of the MiniLM embeddings of its rows of its label, after
  an optional public random projection (seeded, the same for every dataset). Norm <= 1.
* Centroids are public (embeddings of epsilon-0 demonstrations, ``method="public"``) or released by
  DP k-means (``method="dp"``): a few Lloyd iterations from a public initialisation, each adding
  Gaussian noise of std ``sigma`` to every coordinate of every cluster's sum of points and to every
  cluster's count. One unit changes one cluster's sum by a vector of norm <= 1 and its count by 1:
  joint L2 sensitivity sqrt(2), so an iteration is a Gaussian event of noise multiplier
  ``sigma / sqrt(2)``. Centroid = noisy sum / max(noisy count, 1), renormalised: post-processing.
* A unit's cluster is the nearest centroid to its own point (:func:`assign`): a function of that
  unit's rows and the released centroids, so clusters partition the units and the ledger composes
  demonstrations of different clusters in parallel (partition ``label#j``,
  :func:`aggregation.accounting.cluster_partition`).
* Cluster sizes leave only as DP counts (Gaussian of std ``count_sigma``, sensitivity 1).
* The k-means iterations and the size release read every unit of the label: they are charged on
  the LABEL partition (:func:`clustering_events`) before any row is embedded, and compose with
  every cluster partition of that label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import dp_accounting as dpa
import numpy as np

from aggregation.accounting import cluster_partition
from aggregation.mechanisms import Noise
from aggregation.planning import GenerationConfig, Plan, plan_demonstrations
from aggregation.units import UnitPool

Embed = Callable[[Sequence[str]], np.ndarray]
Method = Literal["dp", "public"]


@dataclass(frozen=True)
class ClusterConfig:
    """Public clustering parameters (task ``generation.clusters`` / ``clustering``; ``dpicl eval --clusters``)."""

    clusters: int = 0  # K per label; 0 = off
    method: Method = "dp"
    iterations: int = 2  # Lloyd iterations of DP k-means
    #: Noise std on each coordinate of the cluster sums and on each count, per iteration.
    sigma: float = 6.0
    #: Noise std of the released cluster sizes (sensitivity 1, like the label histogram).
    count_sigma: float = 20.0
    #: Public random projection of the 384-d embeddings (fewer noisy coordinates); None = none.
    dims: int | None = 32
    seed: int = 0  # public seed of the projection and of the random initialisation

    def validate(self) -> None:
        """Raise ``ValueError`` on settings the mechanism cannot run with."""
        if self.clusters < 0:
            raise ValueError("clusters must be 0 (off) or a positive number")
        if self.method not in ("dp", "public"):
            raise ValueError("clustering must be 'dp' or 'public'")
        if self.iterations < 1:
            raise ValueError("DP k-means needs at least one iteration")
        if not (self.sigma > 0 and self.count_sigma > 0):
            raise ValueError("cluster noise must be positive")
        if self.dims is not None and self.dims < 2:
            raise ValueError("dims must be at least 2 (or None for no projection)")

    @property
    def enabled(self) -> bool:
        """Whether clustering is on."""
        return self.clusters > 0


def kmeans_event(config: ClusterConfig) -> dpa.DpEvent:
    """Event of the DP k-means centroids (NoOp for public centroids)."""
    if config.method == "public":
        return dpa.NoOpDpEvent()
    step = dpa.GaussianDpEvent(config.sigma / math.sqrt(2.0))  # joint sensitivity sqrt(1 + 1)
    return step if config.iterations == 1 else dpa.SelfComposedDpEvent(step, config.iterations)


def clustering_events(config: ClusterConfig) -> list[dpa.DpEvent]:
    """Events to charge on the LABEL partition before the label's rows are embedded."""
    if not config.enabled:
        return []
    return [kmeans_event(config), dpa.GaussianDpEvent(config.count_sigma)]


def projection(dim: int, config: ClusterConfig) -> np.ndarray | None:
    """The public random projection ``[dim, dims]`` (seeded from configuration only)."""
    if config.dims is None:
        return None
    rng = np.random.default_rng([config.seed, 19, dim, config.dims])
    return rng.normal(0.0, 1.0 / math.sqrt(config.dims), (dim, config.dims))


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero): every point has norm <= 1."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(norms > 0, x / np.maximum(norms, 1e-12), 0.0)


def unit_points(pool: UnitPool, embed: Embed, config: ClusterConfig) -> np.ndarray:
    """One point per unit: the normalised mean of its rows' embeddings (projected, renormalised).

    Reads private rows: call only after :func:`clustering_events` were charged.
    """
    if not pool.units:
        return np.zeros((0, config.dims or 384))
    texts = [r.text for unit in pool.units for r in unit]
    vectors = np.asarray(embed(texts), dtype=np.float64)
    points, start = [], 0
    for unit in pool.units:
        points.append(vectors[start:start + len(unit)].mean(axis=0))
        start += len(unit)
    return project(np.asarray(points).reshape(len(points), -1), config)


def project(vectors: np.ndarray, config: ClusterConfig) -> np.ndarray:
    """Normalise, apply the public projection, normalise again (row by row: no row sees another)."""
    vectors = normalise(np.asarray(vectors, dtype=np.float64))
    p = projection(vectors.shape[1], config)
    return vectors if p is None or not len(vectors) else normalise(vectors @ p)


def random_centroids(k: int, dim: int, config: ClusterConfig) -> np.ndarray:
    """Public initialisation: ``k`` seeded random points on the unit sphere."""
    rng = np.random.default_rng([config.seed, 7, k, dim])
    return normalise(rng.normal(size=(k, dim)))


def assign(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Each unit's nearest centroid (largest inner product; ties to the lower id), row by row."""
    if not len(points):
        return np.zeros(0, dtype=int)
    return np.argmax(points @ centroids.T, axis=1).astype(int)


def dp_kmeans(points: np.ndarray, init: np.ndarray, config: ClusterConfig, noise: Noise) -> np.ndarray:
    """DP Lloyd iterations from the public ``init``; costs :func:`kmeans_event` (charge it first)."""
    centroids = normalise(init)
    k, dim = centroids.shape
    for _ in range(config.iterations):
        labels = assign(points, centroids)
        sums = np.zeros((k, dim))
        np.add.at(sums, labels, points)
        counts = np.bincount(labels, minlength=k).astype(np.float64)
        noisy_sums = sums + noise.normal(config.sigma, k * dim).reshape(k, dim)
        noisy_counts = counts + noise.normal(config.sigma, k)
        # Post-processing of the noisy release: a non-positive count divides by 1.
        fresh = normalise(noisy_sums / np.maximum(noisy_counts, 1.0)[:, None])
        centroids = np.where(np.linalg.norm(fresh, axis=1, keepdims=True) > 0, fresh, centroids)
    return centroids


@dataclass
class ClusterRelease:
    """One label's clusters: public centroids and DP sizes, plus the private member pools."""

    label: str
    centroids: np.ndarray  # released (public or DP); embedding space, never text
    noisy_sizes: list[float]  # DP counts: the only size that leaves
    members: list[UnitPool]  # private: cluster j's units (never shown, never logged)

    def usable(self, threshold: float) -> list[int]:
        """Cluster ids with noisy size >= ``threshold``, largest noisy size first (DP counts only)."""
        return usable_clusters(self.noisy_sizes, threshold)


def usable_clusters(noisy_sizes: Sequence[float], threshold: float) -> list[int]:
    """The public rule: clusters whose noisy size reaches ``threshold``, largest first, ties by id."""
    ids = [j for j, s in enumerate(noisy_sizes) if math.isfinite(s) and s >= threshold]
    return sorted(ids, key=lambda j: (-noisy_sizes[j], j))


def cluster_label(pool: UnitPool, embed: Embed, config: ClusterConfig, noise: Noise,
                  public_texts: Sequence[str] = ()) -> ClusterRelease:
    """Centroids, DP sizes and member pools of one label (charge :func:`clustering_events` first).

    ``public_texts`` (epsilon-0 demonstrations of the label) give the centroids of the ``public``
    method; the ``dp`` method starts from seeded random points on the sphere.
    """
    config.validate()
    k = config.clusters
    if config.method == "public":
        if len(public_texts) < 1:
            raise ValueError("public centroids need epsilon-0 demonstrations of the label")
        centroids = project(np.asarray(embed(list(public_texts))), config)[:k]
        k = len(centroids)
    points = unit_points(pool, embed, config)
    if config.method == "dp":
        dim = points.shape[1] if len(points) else (config.dims or 384)
        centroids = dp_kmeans(points, random_centroids(k, dim, config), config, noise)
    which = assign(points, centroids)
    counts = np.bincount(which, minlength=k).astype(np.float64)
    noisy = [float(c) for c in counts + noise.normal(config.count_sigma, k)]
    members = [UnitPool(pool.label, tuple(u for u, j in zip(pool.units, which) if j == c)) for c in range(k)]
    return ClusterRelease(pool.label, centroids, noisy, members)


def rows_pool(label: str, rows: Sequence) -> UnitPool:
    """A label's rows as a pool in which every row is its own unit (the evaluation's pools)."""
    return UnitPool(label, tuple((r,) for r in rows))


def cluster_shots(noisy_sizes: Sequence[float], shots: int, threshold: float) -> dict[int, int]:
    """Public rule: ``shots`` demonstrations spread one at a time over the usable clusters, largest first.

    ``{cluster id: shots}``; empty when no cluster reaches ``threshold``. Decided from DP counts
    only. Shots in different clusters compose in parallel (one per cluster costs what one costs).
    """
    order = usable_clusters(noisy_sizes, threshold)
    out: dict[int, int] = {}
    for i in range(shots if order else 0):
        j = order[i % len(order)]
        out[j] = out.get(j, 0) + 1
    return out


def plan_in_clusters(config: GenerationConfig, release: ClusterRelease, shots: int,
                     delta: float) -> tuple[Plan, dict[str, UnitPool]]:
    """Plan ``shots`` demonstrations of ``release.label`` inside its clusters (DP sizes only).

    Returns the plan, keyed by cluster partition (``label#j``, ``q`` from that cluster's noisy
    size), and each planned partition's member pool. When no cluster reaches the pool threshold the
    label's small-pool rule applies (public fallback or skip, :func:`aggregation.planning.decide`).
    """
    per = cluster_shots(release.noisy_sizes, shots, config.pool_threshold)
    if not per:
        return plan_demonstrations(config, {release.label: shots}, {}, delta), {release.label: UnitPool(release.label, ())}
    keys = {cluster_partition(release.label, j): n for j, n in per.items()}
    sizes = {cluster_partition(release.label, j): release.noisy_sizes[j] for j in per}
    members = {cluster_partition(release.label, j): release.members[j] for j in per}
    return plan_demonstrations(config, keys, sizes, delta), members
