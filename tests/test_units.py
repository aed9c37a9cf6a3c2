"""Privacy units: grouping, the one-partition rule, unit counts and the unit sampler."""

import numpy as np
import pytest
from scipy import stats

from aggregation.fewshot import GenerationConfig, generate_demonstration, plan_demonstrations
from aggregation.mechanisms import Noise, poisson_subsets, poisson_unit_subsets
from aggregation.prompts import Example
from aggregation.units import UnitPool, assign_label, group_units, unit_counts, unit_pools
from tests.test_fewshot import NEVER_STOP, RecordingSource

LABELS = ["LOC", "HUM", "NUM"]


def test_rows_without_a_unit_are_their_own_unit():
    rows = [Example("a", "LOC"), Example("b", "LOC", "u1"), Example("c", "HUM", "u1"), Example("d", "LOC")]
    groups = group_units(rows)
    assert [[r.text for r in g] for g in groups] == [["a"], ["b", "c"], ["d"]]
    # A unit id that looks like an internal key cannot merge with unit-less rows.
    assert len(group_units([Example("x", "LOC", "row"), Example("y", "LOC")])) == 2


def test_a_unit_goes_to_its_most_frequent_label_ties_by_label_order():
    unit = [Example("1", "HUM"), Example("2", "NUM"), Example("3", "NUM"), Example("4", "HUM")]
    assert assign_label(unit, LABELS) == "HUM"  # tie HUM/NUM: HUM comes first in the domain
    assert assign_label(unit, ["NUM", "HUM"]) == "NUM"
    assert assign_label([*unit, Example("5", "NUM")], LABELS) == "NUM"
    assert assign_label([Example("z", "OTHER")], LABELS) is None


def test_unit_pools_put_each_unit_in_one_partition_with_its_rows_of_that_label():
    rows = ([Example(f"p{i}", "LOC", "pat") for i in range(5)] + [Example("p-h", "HUM", "pat")]
            + [Example("solo", "HUM"), Example("q1", "NUM", "q"), Example("q2", "HUM", "q")])
    pools = unit_pools(rows, LABELS)
    assert set(pools) == set(LABELS)
    assert [tuple(r.text for r in u) for u in pools["LOC"].units] == [tuple(f"p{i}" for i in range(5))]
    # "q" ties NUM/HUM -> HUM (domain order); its NUM row is used nowhere.
    assert [tuple(r.text for r in u) for u in pools["HUM"].units] == [("solo",), ("q2",)]
    assert len(pools["NUM"]) == 0
    assert unit_counts(pools, LABELS) == {"LOC": 1, "HUM": 2, "NUM": 0}
    used = [r.text for p in pools.values() for u in p.units for r in u]
    assert len(used) == len(set(used))  # disjoint


def test_one_unit_moves_one_count_by_one_however_many_rows_it_has():
    base = [Example(f"r{i}", LABELS[i % 3], f"u{i % 7}") for i in range(40)]
    before = unit_counts(unit_pools(base, LABELS), LABELS)
    big = [Example(f"big{j}", LABELS[j % 3], "big") for j in range(300)]
    after = unit_counts(unit_pools(base + big, LABELS), LABELS)
    diff = {lab: after[lab] - before[lab] for lab in LABELS}
    assert sorted(diff.values()) == [0, 0, 1]


def test_unit_sampler_is_poisson_over_units_with_one_uniform_row_each():
    sizes = [1] * 300 + [5] * 100 + [300]
    q, m, trials = 0.05, 4, 600
    noise = Noise(21)
    hits = np.zeros(len(sizes))
    big_rows = []
    for _ in range(trials):
        subsets = poisson_unit_subsets(sizes, q, m, noise)
        units = [u for s in subsets for u, _ in s]
        assert len(units) == len(set(units))  # a unit appears at most once, in one subset
        assert all(0 <= r < sizes[u] for s in subsets for u, r in s)
        hits[units] += 1
        big_rows += [r for s in subsets for u, r in s if u == len(sizes) - 1]
    # Every unit, big or small, is drawn with the same probability q.
    assert hits.mean() / trials == pytest.approx(q, rel=0.05)
    assert hits[:300].mean() == pytest.approx(hits[300:400].mean(), rel=0.15)
    # The row of a drawn unit is uniform over its rows.
    counts = np.bincount(np.asarray(big_rows) // 30, minlength=10)
    assert stats.chisquare(counts).pvalue > 1e-3


def test_rows_as_units_sample_like_the_row_sampler():
    a = poisson_subsets(50, 0.3, 3, Noise(4))
    b = poisson_unit_subsets([1] * 50, 0.3, 3, Noise(4))
    assert [sorted(u for u, _ in s) for s in b] == [sorted(s.tolist()) for s in a]


def test_a_unit_with_300_rows_adds_at_most_one_row_to_any_step():
    """The canary unit holds 300 rows; every batch the generator opens shows at most one of them."""
    rows = [Example(f"canary secret {j} ?", "LOC", "canary") for j in range(300)]
    rows += [Example(f"ordinary question {i} ?", "LOC", f"person{i % 10}") for i in range(40)]
    rows += [Example(f"single question {i} ?", "LOC") for i in range(10)]
    pool = unit_pools(rows, ["LOC"])["LOC"]
    assert len(pool) == 21 and pool.rows() == 350
    for mode, k in (("resample", None), ("block", 2), ("fixed", None)):
        config = GenerationConfig(mode=mode, block_tokens=k, num_subsets=4, shots_per_subset=2, max_tokens=5,
                                  top_k=5, sigma=1.0, max_prompt_tokens=200)
        plan = plan_demonstrations(config, {"LOC": 1}, {"LOC": float(len(pool))}, 1e-4)
        for seed in range(4):
            src = RecordingSource(caches_state=True)
            batches = []
            real_open = src.open

            def spy(prompts, *a, **kw):
                batches.append(list(prompts))
                return real_open(prompts, *a, **kw)

            src.open = spy
            generate_demonstration(src, NEVER_STOP, pool, "LOC", config, plan.labels["LOC"], Noise(seed))
            assert batches
            for batch in batches:
                assert sum(text.count("canary secret") for text in batch) <= 1
    # And the canary unit is drawn at all (q counts units: 8/21), so the test can fail.
    seen = 0
    for seed in range(20):
        subsets = poisson_unit_subsets(pool.sizes, 8 / 21, 4, Noise(seed))
        seen += any(u == 0 for s in subsets for u, _ in s)
    assert seen > 0


def test_unit_pool_len_counts_units():
    pool = UnitPool("LOC", ((Example("a", "LOC"), Example("b", "LOC")), (Example("c", "LOC"),)))
    assert len(pool) == 2 and pool.sizes == [2, 1] and pool.rows() == 3


def test_deduplicate_drops_repeats_within_a_unit_or_without_units_and_keeps_them_across_units():
    # Pins what docs/privacy.md promises (the old code comment said the opposite of the code).
    from aggregation.datasets import deduplicate

    rows = [Example("same text", "a", "u1"), Example("same text", "a", "u1"),  # within a unit: dropped
            Example("same text", "a", "u2"),  # another unit: kept
            Example("same text", "a"), Example("same text", "a"),  # no unit: dropped
            Example("same text", "b")]  # another label: kept
    kept, dropped = deduplicate(rows)
    assert dropped == 2
    assert kept == [rows[0], rows[2], rows[3], rows[5]]


def test_one_row_per_unit_draws_from_the_csprng_by_default(monkeypatch):
    # Issue 20, section 5: the draw of a unit's row for PE and DP-SGD used NumPy's default_rng;
    # it now uses Noise(None) (os.urandom) like every other sampler of private data.
    from aggregation import mechanisms
    from aggregation.units import one_row_per_unit

    calls = []
    real = mechanisms.Noise.uniform

    def spy(self, size):
        calls.append((self.reproducible, size))
        return real(self, size)

    monkeypatch.setattr(mechanisms.Noise, "uniform", spy)
    rows = [Example(f"row {i}", "a", f"u{i % 3}") for i in range(9)]
    out = one_row_per_unit(rows, ["a"])
    assert len(out) == 3 and len({r.unit for r in out}) == 3
    assert calls == [(False, 3)]  # one CSPRNG draw per unit
    seeded = [one_row_per_unit(rows, ["a"], Noise(7)) for _ in range(2)]
    assert seeded[0] == seeded[1]  # a seed (public data only) reproduces the draw
