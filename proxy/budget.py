"""Privacy-budget accounting over the store's append-only ledger.

:class:`BudgetService` is the only place that turns ledger entries into epsilon. It keeps, per
dataset, a :class:`aggregation.accounting.PartitionedLedger` composed up to the last ledger entry it
has seen and advances it with newer entries only; composing the whole ledger again per request
would cost one PLD composition per entry ever recorded. The cache is rebuilt only when the
dataset's delta changes (epsilon at another delta needs every event again).

Atomicity comes from the store: :meth:`BudgetService.reserve` runs its budget check inside
:meth:`proxy.store.base.Store.append_ledger`, which hands it the dataset's committed ledger under a
lock (SQLite ``BEGIN IMMEDIATE``) or an optimistic transaction (Redis ``WATCH``/``MULTI``), so two
processes can never both fit into the same remaining budget.

Nothing returned here contains private text: events, partitions (labels), numbers, actors and
reasons only.
"""

from __future__ import annotations

import copy
import math
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import dp_accounting as dpa

from aggregation.accounting import WHOLE_DATASET, PartitionedLedger, event_from_dict, event_to_dict
from aggregation.fewshot import noisy_pool_sizes
from aggregation.mechanisms import Noise
from proxy.store.base import BudgetExceeded, Charge, DatasetMeta, LedgerEntry, Store

__all__ = ["BudgetExceeded", "BudgetService", "Reservation"]


@dataclass
class Reservation:
    """Outcome of :meth:`BudgetService.reserve` (or what it would be, for a dry run)."""

    dataset_id: str
    #: Increase of the dataset's spent epsilon caused by the charges (what the request costs).
    epsilon: float
    spent_before: float
    spent_after: float
    budget_epsilon: float
    budget_delta: float
    #: ``budget_epsilon - spent_after`` (negative only for a dry run that would not fit).
    remaining: float
    dry_run: bool
    #: Whether the charges fit the budget (always True for a recorded reservation).
    fits: bool
    #: Ledger sequence numbers of the appended entries (empty for a dry run).
    seqs: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (non-finite numbers become ``None``)."""
        return {k: finite_or_none(v) if isinstance(v, float) else v for k, v in asdict(self).items()}


def finite_or_none(x: float) -> float | None:
    """JSON-safe float: infinite / NaN values (public datasets with non-private charges) -> None."""
    return float(x) if math.isfinite(x) else None


def _fmt(x: float) -> str:
    """Human formatting of an epsilon for error messages."""
    if not math.isfinite(x):
        return "infinity"
    return f"{x:.2f}" if abs(x) >= 0.01 or x == 0 else f"{x:.2g}"


class _Cached:
    """A dataset's composed ledger up to ``last_seq`` at one delta."""

    def __init__(self, delta: float):
        self.delta = delta
        self.ledger = PartitionedLedger(delta)
        self.last_seq = 0
        self.lock = threading.Lock()


class BudgetService:
    """Owns the accounting side of the ledger for every dataset in ``store``. Thread-safe."""

    def __init__(self, store: Store):
        self.store = store
        self._cache: dict[str, _Cached] = {}
        self._cache_lock = threading.Lock()
        self._counts_locks: dict[str, threading.Lock] = {}

    # -- cache --------------------------------------------------------------------------
    def _entry(self, dataset_id: str, delta: float) -> _Cached:
        with self._cache_lock:
            cached = self._cache.get(dataset_id)
            if cached is None or cached.delta != delta:
                # A new delta changes every partition's epsilon: the one case we recompose all.
                cached = self._cache[dataset_id] = _Cached(delta)
            return cached

    @staticmethod
    def _advance(cached: _Cached, entries: Sequence[LedgerEntry]) -> None:
        """Compose entries newer than ``cached.last_seq`` (caller holds ``cached.lock``)."""
        if entries and entries[-1].seq < cached.last_seq:
            # The ledger is shorter than what we composed: the backend was reset (tests, a
            # restored backup). Start again rather than report a spend that is not recorded.
            cached.ledger = PartitionedLedger(cached.delta)
            cached.last_seq = 0
        for e in entries:
            if e.seq <= cached.last_seq:
                continue
            if e.seq != cached.last_seq + 1:
                raise RuntimeError(f"ledger of dataset {e.dataset_id} has a gap before seq {e.seq}")
            cached.ledger.add(e.partition, event_from_dict(e.event))
            cached.last_seq = e.seq

    def _current(self, meta: DatasetMeta) -> _Cached:
        """The cached ledger advanced to the store's current ledger (caller then holds nothing)."""
        cached = self._entry(meta.id, meta.budget_delta)
        # Read outside the lock (store I/O never happens while holding a cache lock, so a thread
        # inside a store transaction waiting for this lock can never deadlock with us).
        newer = self.store.ledger(meta.id, after_seq=cached.last_seq)
        with cached.lock:
            self._advance(cached, newer)
        return cached

    def forget(self, dataset_id: str) -> None:
        """Drop the cached ledger of a dataset (e.g. after deleting it)."""
        with self._cache_lock:
            self._cache.pop(dataset_id, None)

    # -- queries ------------------------------------------------------------------------
    def spent(self, dataset_id: str) -> float:
        """Spent epsilon of a dataset at its budget delta (PLD; max over partitions)."""
        meta = self.store.get_dataset(dataset_id)
        cached = self._current(meta)
        with cached.lock:
            return cached.ledger.spent()

    def status(self, dataset_id: str, include_entries: bool = True) -> dict[str, Any]:
        """Budget epsilon/delta, spent, remaining, per-partition spent and the ledger entries.

        Non-finite numbers (only possible on datasets marked public) are reported as ``None``.
        """
        meta = self.store.get_dataset(dataset_id)
        cached = self._entry(meta.id, meta.budget_delta)
        entries = self.store.ledger(meta.id) if include_entries else self.store.ledger(meta.id, cached.last_seq)
        with cached.lock:
            self._advance(cached, entries)
            spent = cached.ledger.spent()
            per_partition = cached.ledger.per_partition()
        out: dict[str, Any] = {
            "dataset_id": meta.id,
            "name": meta.name,
            "version": meta.version,
            "public": meta.public,
            "budget_epsilon": meta.budget_epsilon,
            "budget_delta": meta.budget_delta,
            "spent_epsilon": finite_or_none(spent),
            "remaining_epsilon": finite_or_none(max(0.0, meta.budget_epsilon - spent)) if math.isfinite(spent) else None,
            "per_partition": {p: finite_or_none(v) for p, v in sorted(per_partition.items())},
        }
        if include_entries:
            out["entries"] = [
                {
                    "seq": e.seq,
                    "partition": e.partition,
                    "event": e.event,
                    "epsilon_after": finite_or_none(e.epsilon_after),
                    "actor": e.actor,
                    "reason": e.reason,
                    "created_at": e.created_at,
                }
                for e in entries
            ]
        return out

    def status_all(self, include_entries: bool = False) -> list[dict[str, Any]]:
        """:meth:`status` of every dataset (entries omitted by default)."""
        return [self.status(m.id, include_entries) for m in self.store.list_datasets()]

    # -- spending -----------------------------------------------------------------------
    def _evaluate(self, meta: DatasetMeta, entries: Sequence[LedgerEntry],
                  charges: Sequence[tuple[str, dpa.DpEvent]], cached: _Cached | None = None,
                  ) -> tuple[float, float, PartitionedLedger, int]:
        """(spent before, spent after, ledger with the charges, last seq before them)."""
        cached = cached or self._entry(meta.id, meta.budget_delta)
        with cached.lock:
            self._advance(cached, entries)
            trial = copy.deepcopy(cached.ledger)
            base_seq = cached.last_seq
        before = trial.spent()
        for partition, event in charges:
            trial.add(partition, event)
        return before, trial.spent(), trial, base_seq

    @staticmethod
    def _refusal(meta: DatasetMeta, before: float, after: float) -> str | None:
        """Why ``after`` is not allowed on ``meta`` (None if it is)."""
        if meta.public:
            # Public data needs no privacy: charges are recorded for the audit trail only.
            return None
        remaining = max(0.0, meta.budget_epsilon - before)
        if not math.isfinite(after):
            return (f"this request is not differentially private (infinite epsilon) and dataset {meta.id} "
                    f"is not marked public; {_fmt(remaining)} of {_fmt(meta.budget_epsilon)} remains")
        if after > meta.budget_epsilon:
            return (f"this request needs epsilon {_fmt(after - before)} but only {_fmt(remaining)} of "
                    f"{_fmt(meta.budget_epsilon)} remains on dataset {meta.id}")
        return None

    def reserve(self, dataset_id: str, charges: Sequence[tuple[str, dpa.DpEvent]], actor: str, reason: str,
                dry_run: bool = False) -> Reservation:
        """Atomically record ``charges`` (``(partition, DpEvent)`` pairs) if they fit the budget.

        Raises :class:`BudgetExceeded` (nothing recorded) when they do not; its message gives the
        remaining budget. Call this BEFORE reading any private row. With ``dry_run`` nothing is
        written and nothing is raised for a charge that does not fit: the returned
        :class:`Reservation` has ``fits=False`` and a negative ``remaining``.
        """
        charges = [(str(p), e) for p, e in charges]
        if dry_run:
            meta = self.store.get_dataset(dataset_id)
            cached = self._entry(meta.id, meta.budget_delta)
            entries = self.store.ledger(dataset_id, after_seq=cached.last_seq)
            before, after, _, _ = self._evaluate(meta, entries, charges, cached)
            return Reservation(meta.id, after - before, before, after, meta.budget_epsilon, meta.budget_delta,
                               meta.budget_epsilon - after, True, self._refusal(meta, before, after) is None)

        seen: dict[str, Any] = {}

        def check(meta: DatasetMeta, entries: Sequence[LedgerEntry]) -> float:
            # Re-run on every retry of an optimistic backend with the fresh ledger.
            before, after, trial, base_seq = self._evaluate(meta, entries, charges)
            why = self._refusal(meta, before, after)
            if why is not None:
                raise BudgetExceeded(why, remaining=max(0.0, meta.budget_epsilon - before))
            seen.update(meta=meta, before=before, after=after, trial=trial, base_seq=base_seq)
            return after

        stored = [Charge(p, event_to_dict(e)) for p, e in charges]
        appended = self.store.append_ledger(dataset_id, stored, actor, reason, check)
        meta = seen["meta"]
        # The trial ledger already holds our committed charges: adopt it if nothing else was
        # composed meanwhile, so the next request composes nothing.
        cached = self._entry(meta.id, meta.budget_delta)
        with cached.lock:
            if appended and cached.last_seq == seen["base_seq"] and appended[0].seq == cached.last_seq + 1:
                cached.ledger, cached.last_seq = seen["trial"], appended[-1].seq
        before, after = seen["before"], seen["after"]
        return Reservation(meta.id, after - before, before, after, meta.budget_epsilon, meta.budget_delta,
                           meta.budget_epsilon - after, False, True, [e.seq for e in appended])

    # -- budget administration ----------------------------------------------------------
    def set_budget(self, dataset_id: str, epsilon: float, delta: float | None = None) -> dict[str, Any]:
        """Set a dataset's budget (``delta=None`` keeps the current delta); returns :meth:`status`.

        Raises ValueError for an invalid budget or one below what is already spent (at the new
        delta: a smaller delta makes the same ledger cost more epsilon).
        """
        epsilon = float(epsilon)
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise ValueError("budget epsilon must be a positive finite number")
        meta = self.store.get_dataset(dataset_id)
        delta = meta.budget_delta if delta is None else float(delta)
        if not 0 < delta < 1:
            raise ValueError("budget delta must be in (0, 1)")
        spent = self._spent_at(meta, delta)
        if epsilon < spent and not meta.public:  # public data: spend is recorded, not limited
            raise ValueError(f"cannot set the budget of dataset {meta.id} to epsilon {_fmt(epsilon)} at delta "
                             f"{delta:g}: {_fmt(spent)} is already spent")
        old = (meta.budget_epsilon, meta.budget_delta)
        fresh = self.store.get_dataset(dataset_id)  # re-read: keep fields changed meanwhile
        fresh.budget_epsilon, fresh.budget_delta = epsilon, delta
        self.store.update_dataset(fresh)
        # A reservation may have committed under the old budget between our check and the write.
        # It was legal when made, but the new budget must not start out exceeded: undo and refuse.
        spent = self._spent_at(fresh, delta)
        if epsilon < spent and not fresh.public:
            fresh.budget_epsilon, fresh.budget_delta = old
            self.store.update_dataset(fresh)
            raise ValueError(f"cannot set the budget of dataset {meta.id} to epsilon {_fmt(epsilon)}: a concurrent "
                             f"request raised the spend to {_fmt(spent)}")
        return self.status(dataset_id)

    def _spent_at(self, meta: DatasetMeta, delta: float) -> float:
        if delta == meta.budget_delta:
            return self.spent(meta.id)
        trial = PartitionedLedger(delta)
        for e in self.store.ledger(meta.id):
            trial.add(e.partition, event_from_dict(e.event))
        return trial.spent()

    # -- DP pool sizes ------------------------------------------------------------------
    def noisy_counts(self, dataset_id: str, actor: str, reason: str = "noisy pool sizes") -> dict[str, float]:
        """DP estimates of the per-label pool sizes (``aggregation.fewshot.noisy_pool_sizes``).

        The first call charges the Gaussian count release on the whole dataset ("*") BEFORE the
        rows are read, then stores the noisy values in the dataset's metadata; later calls return
        them for free (post-processing). Two processes racing on the first call may both pay;
        that over-counts spend (safe) and the first stored release wins.
        """
        with self._cache_lock:
            lock = self._counts_locks.setdefault(dataset_id, threading.Lock())
        with lock:
            meta = self.store.get_dataset(dataset_id)
            if meta.noisy_counts is not None:
                return dict(meta.noisy_counts)
            # The event depends only on the noise scale; with no counts nothing private is touched.
            _, event = noisy_pool_sizes({}, Noise(None))
            self.reserve(dataset_id, [(WHOLE_DATASET, event)], actor, reason)
            rows = self.store.load_rows(dataset_id)
            counts = Counter(label for _, label in rows)
            for label in meta.labels:
                counts.setdefault(label, 0)
            noisy, released = noisy_pool_sizes(counts, Noise(None))
            if released != event:  # pragma: no cover - guards a change in noisy_pool_sizes
                raise RuntimeError("noisy_pool_sizes released a different event than was charged")
            fresh = self.store.get_dataset(dataset_id)
            if fresh.noisy_counts is not None:
                return dict(fresh.noisy_counts)
            fresh.noisy_counts = noisy
            self.store.update_dataset(fresh)
            return dict(noisy)
