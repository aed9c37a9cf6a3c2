"""aggregation.population: spend of a dataset name composed soundly across its versions."""

from __future__ import annotations

import dp_accounting as dpa
import pytest

from aggregation.accounting import PartitionedLedger, epsilon_of
from aggregation.population import MAX_EXACT_CHOICES, PopulationLedger

DELTA = 1e-5


def g(sigma: float) -> dpa.DpEvent:
    return dpa.GaussianDpEvent(sigma)


def test_one_version_is_the_partitioned_ledger():
    pop, part = PopulationLedger(DELTA), PartitionedLedger(DELTA)
    for p, e in (("*", g(20)), ("A", g(3)), ("B", g(5)), ("A", g(4))):
        pop.add("v1", p, e)
        part.add(p, e)
    assert pop.spent() == pytest.approx(part.spent())


def test_a_unit_that_changes_label_between_versions_is_covered():
    """v1 charged label A, v2 charged label B: one person labelled A in v1 and B in v2 is exposed to
    both. The max over labels of either version alone would undercount."""
    pop = PopulationLedger(DELTA)
    pop.add("v1", "A", g(2.0))
    pop.add("v1", "B", g(50.0))
    pop.add("v2", "A", g(50.0))
    pop.add("v2", "B", g(2.0))
    worst = epsilon_of([g(2.0), g(2.0)], DELTA)  # A in v1, then B in v2
    assert pop.spent() == pytest.approx(worst, rel=1e-3)
    naive = max(epsilon_of([g(2.0), g(50.0)], DELTA), epsilon_of([g(50.0), g(2.0)], DELTA))
    assert pop.spent() > naive * 1.2


def test_many_choices_use_an_rdp_upper_bound():
    pop = PopulationLedger(DELTA)
    labels = [f"L{i}" for i in range(5)]
    for v in ("v1", "v2"):  # 25 choice vectors > MAX_EXACT_CHOICES
        pop.add(v, "*", g(20.0))
        for i, lab in enumerate(labels):
            pop.add(v, lab, g(2.0 + i))
    assert len(labels) ** 2 > MAX_EXACT_CHOICES
    exact_worst = epsilon_of([g(20.0), g(2.0), g(20.0), g(2.0)], DELTA, accountant="pld")
    assert pop.spent() >= exact_worst  # an upper bound of the worst vector
    assert pop.spent() <= epsilon_of([g(20.0), g(2.0), g(20.0), g(2.0)], DELTA, accountant="rdp") * 1.001


def test_non_private_event_is_infinite():
    pop = PopulationLedger(DELTA)
    pop.add("v1", "A", g(2.0))
    pop.add("v2", "A", dpa.NonPrivateDpEvent())
    assert pop.spent() == float("inf")
