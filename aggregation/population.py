"""Spent epsilon of a population: the versions of one dataset name, composed soundly.

Every version of a dataset name holds (mostly) the same people, so their charges compose. Within
one version, partitions (labels) are disjoint: a unit sits in exactly one, so that version's loss
is the max over its partitions (:class:`aggregation.accounting.PartitionedLedger`). Across
versions a unit may sit in a *different* partition in each version (its rows or its label
changed), so taking the max per partition over all versions would undercount. The sound
quantity is

    max over choices (p_v for every version v) of epsilon(compose_v events(v, p_v)),

where events(v, p) are the events charged on partition p of version v plus v's whole-dataset
events. A unit absent from a version is covered too: leaving a version out only removes events.

* Few choices (at most :data:`MAX_EXACT_CHOICES` vectors): every vector is composed exactly (PLD,
  or RDP where PLD does not support an event) and the largest epsilon is reported.
* More: the RDP bound ``sum_v max_p RDP_{v,p}(alpha)`` per order, converted to epsilon. A sum of
  per-version maxima is at least the RDP of any single choice vector, so it is an upper bound.

A version with no charges contributes nothing. With one charged version the result is exactly
that version's PartitionedLedger (PLD, max over partitions), so single-version datasets are
reported as before.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import dp_accounting as dpa
import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant

from aggregation.accounting import WHOLE_DATASET, PartitionedLedger, epsilon_of, within
from aggregation.bounded_range import RdpAccountant

#: Largest number of partition-choice vectors composed exactly before the RDP bound is used.
MAX_EXACT_CHOICES = 16


class PopulationLedger:
    """Charges of every version of one dataset name, since the last reset."""

    def __init__(self, delta: float):
        self.delta = delta
        self._versions: dict[str, PartitionedLedger] = {}
        #: Events per version: the whole-dataset ones and the per-partition ones, in order.
        self._events: dict[str, list[tuple[str, dpa.DpEvent]]] = {}
        self._spent: float | None = 0.0
        #: Per version and partition, an RDP accountant kept composed (for the many-choices bound).
        self._rdp: dict[str, dict[str, rdp_privacy_accountant.RdpAccountant]] = {}

    def add(self, version: str, partition: str, event: dpa.DpEvent) -> None:
        """Record ``event`` on ``partition`` (a label or ``"*"``) of dataset version ``version``."""
        self._versions.setdefault(version, PartitionedLedger(self.delta)).add(partition, event)
        self._events.setdefault(version, []).append((partition, event))
        self._add_rdp(version, partition, event)
        self._spent = None

    def _add_rdp(self, version: str, partition: str, event: dpa.DpEvent) -> None:
        parts = self._rdp.setdefault(version, {})
        if partition == WHOLE_DATASET:
            targets = list(parts) or [WHOLE_DATASET]
        else:
            if partition not in parts:
                # A new partition starts from the version's whole-dataset events so far (and, for
                # a cluster partition label#j, its label's events: they read every unit of the label).
                acc = RdpAccountant()
                for p, e in self._events[version][:-1]:
                    if p == WHOLE_DATASET or within(partition, p):
                        _compose_rdp(acc, e)
                parts[partition] = acc
            # A label's event also reaches its cluster partitions.
            targets = [partition, *(t for t in parts if within(t, partition))]
        for t in targets:
            _compose_rdp(parts.setdefault(t, RdpAccountant()), event)

    def versions(self) -> list[str]:
        """Versions with at least one charge."""
        return list(self._versions)

    def per_partition(self) -> dict[str, float]:
        """Spent epsilon per partition, named ``label`` (one version) or ``version/label``."""
        if len(self._versions) <= 1:
            return {p: e for led in self._versions.values() for p, e in led.per_partition().items()}
        return {f"{v}/{p}": e for v, led in self._versions.items() for p, e in led.per_partition().items()}

    def _choices(self, version: str) -> dict[str, list[dpa.DpEvent]]:
        """Per partition of a version, the events a unit in it is exposed to (whole events too)."""
        events = self._events[version]
        labels = [p for p, _ in events if p != WHOLE_DATASET]
        names = list(dict.fromkeys(labels)) or [WHOLE_DATASET]
        return {n: [e for p, e in events if p in (n, WHOLE_DATASET) or within(n, p)] for n in names}

    def spent(self) -> float:
        """Worst-case epsilon of one unit over every version (see the module docstring)."""
        if self._spent is None:
            self._spent = self._compute()
        return self._spent

    def _compute(self) -> float:
        if not self._versions:
            return 0.0
        if len(self._versions) == 1:
            return next(iter(self._versions.values())).spent()
        composed = [led.partition_accountants() for led in self._versions.values()]
        if math.prod(len(c) for c in composed) <= MAX_EXACT_CHOICES and all(
                kind == "pld" for c in composed for kind, _ in c.values()):
            return self._exact_pld(composed)
        per_version = [self._choices(v) for v in self._versions]
        n_vectors = math.prod(len(c) for c in per_version)
        if n_vectors <= MAX_EXACT_CHOICES:
            worst = 0.0
            for vector in itertools.product(*(list(c.values()) for c in per_version)):
                events = [e for chosen in vector for e in chosen]
                worst = max(worst, _epsilon(events, self.delta))
            return worst
        return self._rdp_bound()

    def _rdp_bound(self) -> float:
        """``sum_v max_p RDP_{v,p}(alpha)`` per order, as epsilon (an upper bound of every choice)."""
        total, orders = None, None
        for parts in self._rdp.values():
            curves = []
            for acc in parts.values():
                if getattr(acc, "_non_private", False):
                    return math.inf
                # The accountant keeps its RDP curve at fixed orders; the bound needs the curve
                # itself to take the maximum over partitions order by order.
                orders, curve = np.asarray(acc._orders), np.asarray(acc._rdp, dtype=float)
                curves.append(curve)
            worst = np.max(np.stack(curves), axis=0)
            total = worst if total is None else total + worst
        if total is None:
            return 0.0
        if not np.all(np.isfinite(total)):
            return math.inf
        eps, _ = rdp_privacy_accountant.compute_epsilon(orders, total, self.delta)
        return float(eps)


    def _exact_pld(self, composed: list[dict[str, tuple[str, dpa.PrivacyAccountant]]]) -> float:
        """Every choice vector from the partitions' already composed PLDs (one convolution per
        version instead of composing every event again)."""
        worst = 0.0
        for vector in itertools.product(*(list(c.values()) for c in composed)):
            # PLDAccountant keeps its composed distribution in ``_pld`` and notes non-DP events.
            if any(getattr(acc, "_contains_non_dp_event", False) for _, acc in vector):
                return math.inf
            pld = vector[0][1]._pld
            for _, acc in vector[1:]:
                pld = pld.compose(acc._pld)
            worst = max(worst, float(pld.get_epsilon_for_delta(self.delta)))
        return worst


def _epsilon(events: Sequence[dpa.DpEvent], delta: float) -> float:
    # PLD, best-of PLD and RDP for bounded-range blocks, or RDP (see aggregation.accounting).
    return epsilon_of(events, delta)


def _compose_rdp(acc: rdp_privacy_accountant.RdpAccountant, event: dpa.DpEvent) -> None:
    if not acc.supports(event):
        acc._non_private = True  # e.g. NonPrivateDpEvent: infinite loss
        return
    acc.compose(event)
