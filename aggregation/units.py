"""Privacy units: the rows of one person (or customer, patient...) are protected together.

Rows may carry a unit id (:attr:`aggregation.prompts.Example.unit`); a row without one is its own
unit. The neighbouring relation becomes "add or remove one whole unit", and every released value
must move no more under it than it moved under "add or remove one row" without units:

* Each unit is assigned to exactly one label partition by :func:`assign_label`, a rule that looks
  only at that unit's rows: its most frequent label, ties broken by the order of the label domain
  (the declared order; sorted label names when none is given). Its pool entry in that partition
  holds its rows of that label; its rows of other labels are not used anywhere. So one unit sits
  in one partition, as one entry.
* Pool sizes, the DP label histogram and the sampling rate count units (:func:`unit_counts`): one
  unit moves one count by 1.
* Sampling is Poisson over units, then one uniformly drawn row of each sampled unit
  (:func:`aggregation.mechanisms.poisson_unit_subsets`), so a unit adds at most one row to one of
  the ``M`` prompts at any step, exactly as one row did.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence

from aggregation.mechanisms import Noise
from aggregation.prompts import Example


@dataclass(frozen=True)
class UnitPool:
    """One label's pool over units: one entry per unit assigned to the label (its rows of it).

    ``len()`` is the number of units, the size the sampling rate ``q = M*N/n`` counts.
    """

    label: str
    units: tuple[tuple[Example, ...], ...]

    def __len__(self) -> int:
        return len(self.units)

    @property
    def sizes(self) -> list[int]:
        """Rows per unit entry."""
        return [len(u) for u in self.units]

    def rows(self) -> int:
        """Rows in the pool (admin statistics only; the mechanisms never use it)."""
        return sum(self.sizes)


def _unit_of(row: Example, index: int) -> Hashable:
    # A tuple cannot collide with a string unit id, so a row without a unit is alone in its unit.
    return row.unit if row.unit is not None else ("row", index)


def group_units(rows: Sequence[Example]) -> list[list[Example]]:
    """Rows grouped by unit, in order of each unit's first row."""
    groups: dict[Hashable, list[Example]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(_unit_of(row, i), []).append(row)
    return list(groups.values())


def assign_label(unit_rows: Sequence[Example], label_order: Sequence[str]) -> str | None:
    """The one partition a unit belongs to: its most frequent label among ``label_order``.

    Ties go to the label that comes first in ``label_order``. Looks at this unit's rows only.
    ``None`` when none of its rows has a label of the domain (the unit is then left out).
    """
    rank = {lab: i for i, lab in enumerate(label_order)}
    counts = Counter(r.label for r in unit_rows if r.label in rank)
    if not counts:
        return None
    return min(counts, key=lambda lab: (-counts[lab], rank[lab]))


def unit_pools(rows: Sequence[Example], labels: Sequence[str] | None = None) -> dict[str, UnitPool]:
    """Disjoint per-label pools of units (every label of ``labels`` present, possibly empty).

    ``labels`` is the label domain in its declared order (it breaks ties); by default the sorted
    labels of the rows. Rows with a label outside the domain are ignored.
    """
    order = list(labels) if labels is not None else sorted({r.label for r in rows})
    entries: dict[str, list[tuple[Example, ...]]] = {lab: [] for lab in order}
    for unit in group_units(rows):
        lab = assign_label(unit, order)
        if lab is not None:
            entries[lab].append(tuple(r for r in unit if r.label == lab))
    return {lab: UnitPool(lab, tuple(es)) for lab, es in entries.items()}


def unit_counts(pools: Mapping[str, UnitPool], labels: Sequence[str] | None = None) -> dict[str, int]:
    """Units per label: the histogram to release with DP noise (one unit moves one count by 1).

    With ``labels`` (the declared domain), every label gets a count, zeros included.
    """
    names = list(labels) if labels is not None else list(pools)
    return {lab: len(pools[lab]) if lab in pools else 0 for lab in names}


def one_row_per_unit(rows: Sequence[Example], labels: Sequence[str], noise: Noise | None = None) -> list[Example]:
    """Every unit reduced to one row: drawn uniformly from its rows of its assigned label.

    For mechanisms that sample rows (DP-SGD's Poisson batches, PE's votes): after this, adding or
    removing a unit adds or removes exactly one row, so their row-level accounting becomes
    unit-level. The draw for a unit looks at that unit's rows only. ``noise`` (default
    ``Noise(None)``: CSPRNG uniforms, like every other sampler of private data) supplies the draws;
    a seeded one is for public data only.
    """
    import numpy as np

    gen = noise if noise is not None else Noise(None)
    out: list[Example] = []
    for pool in unit_pools(rows, labels).values():
        if not len(pool):
            continue
        picks = np.floor(gen.uniform(len(pool)) * np.asarray(pool.sizes)).astype(int)
        out.extend(entry[min(int(i), len(entry) - 1)] for entry, i in zip(pool.units, picks))
    return out
