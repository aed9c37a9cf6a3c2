"""Privacy accounting on Google's dp-accounting.

Privacy costs are data: every mechanism emits a ``dp_accounting.DpEvent``; a ledger stores events
per partition (label); this module turns events into epsilon.

Which bound is reported
-----------------------
We report the epsilon of the PLD (privacy loss distribution) accountant under add/remove-one
neighbours with *pessimistic* discretisation: dp-accounting rounds privacy losses upwards, so the
value is an upper bound on the true epsilon at every discretisation interval. The library default
interval (1e-4) is slow (seconds per composition, minutes per calibration); we use 1e-3, which on
the reference setting changes epsilon by under 0.001 % and is about 10x faster. Events the PLD
accountant does not support (e.g. the zCDP events of ledgers written before 2026-12) make the whole
partition fall back to the RDP accountant, which is also an upper bound, only a looser one.
Blocks of bounded-range tokens (exponential and public-prior mechanisms,
:mod:`aggregation.bounded_range`) are composed by both accountants and the smaller epsilon is
reported (kind ``"best"``): each is an upper bound on the same composition.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import attrs
import dp_accounting as dpa

from aggregation.bounded_range import (BestOfAccountant, PldAccountant, RdpAccountant, SampledBoundedRangeDpEvent,
                                       contains_block)

#: PLD value-discretisation interval used everywhere (ledger and calibration checks).
PLD_DISCRETIZATION = 1e-3
#: Coarser interval used only while bisecting during calibration; the result is re-checked
#: at ``PLD_DISCRETIZATION`` so the calibrated sigma is never below what the ledger needs.
_CALIBRATION_SEARCH_DISCRETIZATION = 1e-2

#: Partition name for events that touch the whole dataset (they compose into every label).
WHOLE_DATASET = "*"
#: Separator of a cluster partition key ``<label>#<cluster>`` (see :func:`cluster_partition`).
CLUSTER_SEPARATOR = "#"


def cluster_partition(label: str, cluster: int) -> str:
    """Ledger partition of cluster ``cluster`` inside ``label``'s partition (label x cluster)."""
    if cluster < 0:
        raise ValueError("cluster ids are non-negative")
    return f"{label}{CLUSTER_SEPARATOR}{int(cluster)}"


def parent_label(partition: str) -> str | None:
    """The label whose partition contains cluster partition ``partition`` (``None``: not a cluster key).

    A label that itself looks like ``x#3`` is read as cluster 3 of ``x``: its partition then also
    composes label ``x``'s events, which only over-counts (the bound stays an upper bound).
    """
    label, sep, tail = partition.rpartition(CLUSTER_SEPARATOR)
    return label if sep and label and tail.isdigit() else None


#: Accountant kinds from the tightest-but-narrowest to the widest: a partition uses the first
#: kind that supports all its events.
KINDS = ("pld", "best", "rdp")


def make_accountant(kind: str = "pld", discretization: float = PLD_DISCRETIZATION) -> dpa.PrivacyAccountant:
    """A fresh add/remove-one accountant: ``"pld"`` (default), ``"rdp"``, or ``"best"`` (both
    composed, the smaller epsilon reported; for bounded-range blocks)."""
    if kind == "pld":
        return PldAccountant(value_discretization_interval=discretization)
    if kind == "rdp":
        return RdpAccountant()
    if kind == "best":
        return BestOfAccountant(discretization)
    raise ValueError(f"unknown accountant {kind!r}; use 'pld', 'best' or 'rdp'")


def pld_supports(event: dpa.DpEvent) -> bool:
    """Whether the PLD accountant can compose ``event`` exactly."""
    return make_accountant("pld").supports(event)


def kind_for(event: dpa.DpEvent) -> str:
    """The accountant kind for ``event``: PLD, PLD-or-RDP (bounded-range blocks), else RDP."""
    if not pld_supports(event):
        return "rdp"
    return "best" if contains_block(event) else "pld"


def kind_of(events: Iterable[dpa.DpEvent]) -> str:
    """The widest kind any of ``events`` needs (``"pld"`` for none)."""
    return max((kind_for(e) for e in events), key=KINDS.index, default="pld")


def epsilon_of(events: Iterable[dpa.DpEvent], delta: float, accountant: str = "auto") -> float:
    """Epsilon at ``delta`` of the composition of ``events`` (``auto``: :func:`kind_of`)."""
    events = list(events)
    kind = kind_of(events) if accountant == "auto" else accountant
    acc = make_accountant(kind)
    for e in events:
        acc.compose(e)
    return float(acc.get_epsilon(delta))


# ---------------------------------------------------------------------------------------------
# Serialisation: the ledger stores events as JSON.

_EVENT_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        dpa.NoOpDpEvent,
        dpa.NonPrivateDpEvent,
        dpa.GaussianDpEvent,
        dpa.LaplaceDpEvent,
        dpa.ZCDpEvent,
        dpa.PoissonSampledDpEvent,
        dpa.SampledWithoutReplacementDpEvent,
        dpa.SampledWithReplacementDpEvent,
        dpa.SelfComposedDpEvent,
        dpa.ComposedDpEvent,
        dpa.RandomizedResponseDpEvent,
        SampledBoundedRangeDpEvent,
    )
}


def event_to_dict(event: dpa.DpEvent) -> dict[str, Any]:
    """JSON-able dict of a DpEvent (nested events are nested dicts, tagged by class name)."""
    out: dict[str, Any] = {"type": type(event).__name__}
    for f in attrs.fields(type(event)):
        value = getattr(event, f.name)
        if isinstance(value, dpa.DpEvent):
            value = event_to_dict(value)
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], dpa.DpEvent):
            value = [event_to_dict(v) for v in value]
        out[f.name] = value
    return out


def event_from_dict(data: Mapping[str, Any]) -> dpa.DpEvent:
    """Inverse of :func:`event_to_dict`."""
    kind = data.get("type")
    cls = _EVENT_TYPES.get(str(kind))
    if cls is None:
        raise ValueError(f"unknown DpEvent type {kind!r}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key == "type":
            continue
        if isinstance(value, Mapping):
            value = event_from_dict(value)
        elif isinstance(value, list) and value and isinstance(value[0], Mapping):
            value = [event_from_dict(v) for v in value]
        kwargs[key] = value
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Calibration.


def check_noise_or_target(noise: float | None, epsilon: float | None, noise_name: str = "sigma",
                          allow_infinite: bool = False) -> None:
    """Validate a mechanism's "explicit noise parameter, or target epsilon to calibrate" pair."""
    if noise is None and epsilon is None:
        raise ValueError(f"give a target epsilon or a {noise_name}")
    if noise is not None and not noise > 0:
        raise ValueError(f"{noise_name} must be positive")
    if noise is None:
        if not epsilon > 0:
            raise ValueError("epsilon must be positive")
        if math.isinf(epsilon) and not allow_infinite:
            raise ValueError("epsilon must be a positive finite number")


def calibrate_sigma(
    make_event: Callable[[float], dpa.DpEvent],
    target_epsilon: float,
    delta: float,
    rel_tol: float = 1e-3,
    guess: float = 1.0,
    final_event: Callable[[float], dpa.DpEvent] | None = None,
) -> float:
    """Smallest noise multiplier (within ``rel_tol``) whose event costs at most ``target_epsilon``.

    Epsilon falls as the noise multiplier grows. The search brackets the answer by doubling or
    halving from ``guess``, then narrows it with dp-accounting's ``calibrate_dp_mechanism``
    (Brent's method, returning a value that meets the target), both on a coarse pessimistic PLD
    (or RDP for events PLD cannot compose), and finally checks at the ledger's discretisation,
    stepping sigma up until the check passes. The returned sigma therefore satisfies
    ``epsilon_of([final_event(sigma)], delta) <= target_epsilon`` exactly as the ledger computes it.
    (The library's own bracketing, or an RDP bracket as used before, evaluates tiny or many noise
    values: an RDP evaluation of a subsampled Gaussian costs about 0.2 s, a coarse PLD one 0.05 s.)

    ``final_event`` (default ``make_event``) is the event of that last check: a caller that
    searched on a bound (e.g. a sampling rate rounded up) checks the event it will record.
    """
    if not target_epsilon > 0 or math.isinf(target_epsilon):
        raise ValueError("target epsilon must be a positive finite number")
    if not 0 < delta < 1:
        raise ValueError("delta must be in (0, 1)")
    if not guess > 0:
        raise ValueError("guess must be positive")
    kind = kind_for(make_event(1.0))
    # Bounded-range blocks are two-point PLDs: cheap at the ledger's interval, and their per-token
    # losses are small enough that the coarse interval would overstate epsilon by several percent.
    coarse = PLD_DISCRETIZATION if kind == "best" else _CALIBRATION_SEARCH_DISCRETIZATION

    def eps(sigma: float, disc: float, make: Callable[[float], dpa.DpEvent] = make_event) -> float:
        acc = make_accountant(kind, disc)
        with _quiet_absl():
            acc.compose(make(sigma))
            return float(acc.get_epsilon(delta))

    lo, hi = _bracket(lambda s: eps(s, coarse) > target_epsilon, guess)
    with _quiet_absl():
        sigma = float(dpa.calibrate_dp_mechanism(
            lambda: make_accountant(kind, coarse), make_event, target_epsilon, delta,
            bracket_interval=dpa.ExplicitBracketInterval(lo, hi), tol=rel_tol * lo,
        ))
    check = final_event or make_event
    kind = max(kind, kind_for(check(sigma)), key=KINDS.index)
    return _step_up(lambda s: eps(s, PLD_DISCRETIZATION, check), sigma, target_epsilon, rel_tol)


def _bracket(too_little: Callable[[float], bool], guess: float) -> tuple[float, float]:
    """``(lo, hi)`` with too little noise at ``lo`` and enough at ``hi``, doubling or halving."""
    if too_little(guess):
        lo, hi = guess, guess * 2
        while too_little(hi):
            if hi > 1e6:
                raise ValueError("no noise multiplier up to 1e6 meets this target")
            lo, hi = hi, hi * 2
        return lo, hi
    hi, lo = guess, guess / 2
    while not too_little(lo):
        if lo < 1e-6:
            raise ValueError("no noise is needed for this target; the event does not depend on sigma")
        hi, lo = lo, lo / 2
    return lo, hi


@contextlib.contextmanager
def _quiet_absl():
    """dp-accounting's RDP code logs a warning for every skipped order while bracketing; the
    skipped orders only make the bound looser, so hide the noise for the bracketing phase."""
    logger = logging.getLogger("absl")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def calibrate_after(
    prior: dpa.DpEvent,
    make_event: Callable[[float], dpa.DpEvent],
    target_epsilon: float,
    delta: float,
) -> float:
    """Noise parameter for ``make_event`` so that ``prior`` composed with it costs the target.

    Used when a run also pays for an earlier release (e.g. the DP label histogram); refuses a
    target that the prior release alone already exceeds.
    """
    base = epsilon_of([prior], delta)
    if base >= target_epsilon:
        raise ValueError(f"epsilon {target_epsilon} is below the label histogram's own cost ({base:.3f}); "
                         "raise epsilon or count_sigma")
    return calibrate_sigma(lambda s: dpa.ComposedDpEvent([prior, make_event(s)]), target_epsilon, delta)


def _step_up(eps_fn: Callable[[float], float], sigma: float, target: float, rel_tol: float) -> float:
    for _ in range(200):
        if eps_fn(sigma) <= target:
            return sigma
        sigma *= 1 + rel_tol
    raise RuntimeError("calibration did not converge")  # pragma: no cover - defensive


# ---------------------------------------------------------------------------------------------
# Ledger maths: per-partition composition with cached accountants.


@dataclass
class _Partition:
    accountant: dpa.PrivacyAccountant
    kind: str
    events: list[dpa.DpEvent] = field(default_factory=list)
    epsilon: float = 0.0


def within(partition: str, label: str) -> bool:
    """Whether ``partition`` is a (possibly nested) cluster partition inside ``label``'s partition."""
    parent = parent_label(partition)
    while parent is not None:
        if parent == label:
            return True
        parent = parent_label(parent)
    return False


class PartitionedLedger:
    """Composes events per partition and reports a dataset's spent epsilon.

    Partitions are disjoint pools (one per label). Under add/remove neighbours a record touches one
    partition only, so the dataset's epsilon is the max over partitions (parallel composition).
    Events recorded on :data:`WHOLE_DATASET` compose into every partition, including ones that
    first appear later. Accountants are kept composed, so adding an event costs one composition and
    reading the spent epsilon costs nothing.

    Partitions nest one level: a cluster partition :func:`cluster_partition` ``(label, j)`` holds
    the units of ``label`` that the clustering put in cluster ``j``. A unit sits in one cluster of
    one label, so its loss is (whole-dataset events) + (its label's events) + (its cluster's
    events): each cluster partition composes its label's events too (also ones recorded after it
    appeared), and the label partition itself stands for the label's units outside every charged
    cluster. The maximum over all partitions is then an upper bound on every unit's loss.
    """

    def __init__(self, delta: float):
        if not 0 < delta < 1:
            raise ValueError("delta must be in (0, 1)")
        self.delta = delta
        self._whole: list[dpa.DpEvent] = []
        self._parts: dict[str, _Partition] = {}
        self.entries = 0

    def _new_partition(self, events: Sequence[dpa.DpEvent]) -> _Partition:
        kind = kind_of(events)
        part = _Partition(make_accountant(kind), kind)
        for e in events:
            part.accountant.compose(e)
            part.events.append(e)
        part.epsilon = float(part.accountant.get_epsilon(self.delta)) if events else 0.0
        return part

    def _compose(self, part: _Partition, event: dpa.DpEvent) -> _Partition:
        if KINDS.index(kind_for(event)) > KINDS.index(part.kind):
            # Widen this partition's accountant (PLD -> best-of -> RDP): rebuild from its history.
            return self._new_partition([*part.events, event])
        part.accountant.compose(event)
        part.events.append(event)
        part.epsilon = float(part.accountant.get_epsilon(self.delta))
        return part

    def _partition(self, name: str) -> _Partition:
        """``name``'s partition, created from what it inherits (its label's events, or the whole dataset's)."""
        part = self._parts.get(name)
        if part is None:
            parent = parent_label(name)
            inherited = self._partition(parent).events if parent is not None else self._whole
            part = self._parts[name] = self._new_partition(inherited)
        return part

    def add(self, partition: str, event: dpa.DpEvent) -> None:
        """Record ``event`` on ``partition`` (a label, a cluster partition, or :data:`WHOLE_DATASET`)."""
        self.entries += 1
        if partition == WHOLE_DATASET:
            self._whole.append(event)
            if not self._parts:
                self._parts[WHOLE_DATASET] = self._new_partition([])
            for name in list(self._parts):
                self._parts[name] = self._compose(self._parts[name], event)
            return
        self._parts[partition] = self._compose(self._partition(partition), event)
        # A label's event also composes into each of its cluster partitions (and theirs, should a
        # label itself read as a cluster key: over-counting keeps the bound an upper bound).
        for name in [n for n in self._parts if within(n, partition)]:
            self._parts[name] = self._compose(self._parts[name], event)

    def epsilon_if(self, partition: str, event: dpa.DpEvent) -> float:
        """Dataset epsilon if ``event`` were added on ``partition`` (the ledger is unchanged)."""
        trial = copy.deepcopy(self)
        trial.add(partition, event)
        return trial.spent()

    def epsilon_if_many(self, charges: Sequence[tuple[str, dpa.DpEvent]]) -> float:
        """Dataset epsilon if all ``(partition, event)`` charges were added."""
        trial = copy.deepcopy(self)
        for partition, event in charges:
            trial.add(partition, event)
        return trial.spent()

    def spent(self) -> float:
        """The dataset's spent epsilon: max over partitions (0 when nothing is recorded)."""
        return max((p.epsilon for p in self._parts.values()), default=0.0)

    def partition_accountants(self) -> dict[str, tuple[str, dpa.PrivacyAccountant]]:
        """``{partition: (kind, composed accountant)}`` (read-only use: whole-dataset events included)."""
        return {name: (p.kind, p.accountant) for name, p in self._parts.items()}

    def per_partition(self) -> dict[str, float]:
        """Spent epsilon of each partition (whole-dataset events included in each)."""
        return {name: p.epsilon for name, p in self._parts.items()}
