"""Privacy-budget accounting over the store's append-only ledger, one ledger per dataset name.

:class:`BudgetService` is the only place that turns ledger entries into epsilon. Every version of
a dataset name (a population: the same people) shares one budget and one ledger, so the spent
epsilon composes the charges of every version since the last explicit reset
(:class:`aggregation.population.PopulationLedger`: exact per-partition PLD for one version, the
worst partition choice per version across versions). It keeps, per name, the composed ledger up to
the last entry it has seen and advances it with newer entries only. The cache is rebuilt only
when the delta changes or after a reset.

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
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import dp_accounting as dpa

from aggregation.accounting import WHOLE_DATASET, event_from_dict, event_to_dict
from aggregation.fewshot import noisy_pool_sizes
from aggregation.mechanisms import Noise
from aggregation.population import PopulationLedger
from aggregation.prompts import Example
from aggregation.quantile import WidthRelease, release_widths, unit_lengths, width_event
from aggregation.units import unit_counts, unit_pools
from proxy.store.base import BudgetExceeded, Charge, DatasetMeta, LedgerEntry, Population, Store

__all__ = ["BudgetExceeded", "BudgetService", "Reservation"]


@dataclass
class Reservation:
    """Outcome of :meth:`BudgetService.reserve` (or what it would be, for a dry run)."""

    dataset_id: str
    #: Increase of the (dataset name's) spent epsilon caused by the charges (what the request costs).
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
    """A name's composed ledger up to ``last_seq`` at one delta."""

    def __init__(self, delta: float):
        self.delta = delta
        self.ledger = PopulationLedger(delta)
        self.last_seq = 0
        self.lock = threading.Lock()


def compose_entries(ledger: PopulationLedger, entries: Sequence[LedgerEntry]) -> PopulationLedger:
    """Add ``entries`` to ``ledger``; a reset marker starts a fresh ledger. Returns the ledger."""
    for e in entries:
        if e.kind == "reset":
            ledger = PopulationLedger(ledger.delta)
            continue
        ledger.add(e.dataset_id, e.partition, event_from_dict(e.event))
    return ledger


def _ledger_view(e: LedgerEntry) -> dict[str, Any]:
    return {"seq": e.seq, "time": e.created_at, "kind": e.kind, "ref": e.ref, "dataset_id": e.dataset_id,
            "partition": e.partition, "event": e.event, "epsilon_after": finite_or_none(e.epsilon_after),
            "actor": e.actor, "reason": e.reason}


class BudgetService:
    """Owns the accounting side of the ledger for every dataset name in ``store``. Thread-safe."""

    def __init__(self, store: Store):
        self.store = store
        self._cache: dict[str, _Cached] = {}
        self._cache_lock = threading.Lock()
        self._counts_locks: dict[str, threading.Lock] = {}
        self._width_locks: dict[tuple[str, str], threading.Lock] = {}

    # -- cache --------------------------------------------------------------------------
    def _entry(self, name: str, delta: float) -> _Cached:
        with self._cache_lock:
            cached = self._cache.get(name)
            if cached is None or cached.delta != delta:
                # A new delta changes every partition's epsilon: the one case we recompose all.
                cached = self._cache[name] = _Cached(delta)
            return cached

    @staticmethod
    def _advance(cached: _Cached, entries: Sequence[LedgerEntry]) -> None:
        """Compose entries newer than ``cached.last_seq`` (caller holds ``cached.lock``)."""
        if entries and entries[-1].seq < cached.last_seq:
            # The ledger is shorter than what we composed: the backend was replaced (tests, a
            # restored backup). Start again rather than report a spend that is not recorded.
            cached.ledger = PopulationLedger(cached.delta)
            cached.last_seq = 0
        for e in entries:
            if e.seq <= cached.last_seq:
                continue
            if e.seq != cached.last_seq + 1:
                raise RuntimeError(f"ledger of dataset name {e.name} has a gap before seq {e.seq}")
            cached.ledger = compose_entries(cached.ledger, [e])
            cached.last_seq = e.seq

    def _current(self, name: str, delta: float) -> _Cached:
        """The cached ledger advanced to the store's current ledger (caller then holds nothing)."""
        cached = self._entry(name, delta)
        # Read outside the lock (store I/O never happens while holding a cache lock, so a thread
        # inside a store transaction waiting for this lock can never deadlock with us).
        newer = self.store.ledger(name, after_seq=cached.last_seq)
        with cached.lock:
            self._advance(cached, newer)
        return cached

    def forget(self, dataset_id: str) -> None:
        """Kept for callers of the per-dataset API: ledgers are per name and outlive versions."""

    # -- queries ------------------------------------------------------------------------
    def spent(self, dataset_id: str) -> float:
        """Spent epsilon of a dataset's name at its budget delta."""
        meta = self.store.get_dataset(dataset_id)
        cached = self._current(meta.name, meta.budget_delta)
        with cached.lock:
            return cached.ledger.spent()

    def spent_by_name(self, name: str) -> float:
        """Spent epsilon of a dataset name at its budget delta (raises NotFound)."""
        pop = self.store.get_population(name)
        cached = self._current(name, pop.budget_delta)
        with cached.lock:
            return cached.ledger.spent()

    def status(self, dataset_id: str, include_entries: bool = True) -> dict[str, Any]:
        """Budget, spent, remaining and per-partition spent of a dataset's name (old shape).

        Non-finite numbers (only possible on datasets marked public) are reported as ``None``.
        """
        meta = self.store.get_dataset(dataset_id)
        cached = self._entry(meta.name, meta.budget_delta)
        entries = self.store.ledger(meta.name) if include_entries else self.store.ledger(meta.name, cached.last_seq)
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
                {"seq": e.seq, "partition": e.partition, "event": e.event, "epsilon_after": finite_or_none(e.epsilon_after),
                 "actor": e.actor, "reason": e.reason, "created_at": e.created_at, "dataset_id": e.dataset_id,
                 "kind": e.kind, "ref": e.ref}
                for e in entries
            ]
        return out

    def status_all(self, include_entries: bool = False) -> list[dict[str, Any]]:
        """:meth:`status` of every dataset (entries omitted by default)."""
        return [self.status(m.id, include_entries) for m in self.store.list_datasets()]

    def population_view(self, pop: Population, include_ledger: bool = False) -> dict[str, Any]:
        """The budget view of a dataset name (docs/admin-api.md, "Budgets and audit")."""
        cached = self._entry(pop.name, pop.budget_delta)
        entries = self.store.ledger(pop.name)
        with cached.lock:
            self._advance(cached, entries)
            spent = cached.ledger.spent()
            per_partition = cached.ledger.per_partition()
        charges = [e for e in entries if e.kind != "reset"]
        out: dict[str, Any] = {
            "object": "budget", "name": pop.name, "epsilon_budget": pop.budget_epsilon,
            "delta_budget": pop.budget_delta, "epsilon_spent": finite_or_none(spent),
            # Epsilon is reported at the budget's delta; 0 while nothing is charged.
            "delta_spent": pop.budget_delta if spent > 0 else 0.0,
            "epsilon_remaining": finite_or_none(max(0.0, pop.budget_epsilon - spent)) if math.isfinite(spent) else None,
            "versions": list(pop.versions), "events": len(charges),
            "resets": sum(1 for e in entries if e.kind == "reset"),
            # Spent epsilon per partition: "*", a label, or "label#j" (cluster j of a label, whose
            # events compose with the label's); ``version/...`` once several versions were charged.
            "partitions": {p: finite_or_none(v) for p, v in sorted(per_partition.items())},
        }
        if include_ledger:
            out["ledger"] = [_ledger_view(e) for e in entries]
        return out

    def population(self, name: str, include_ledger: bool = True) -> dict[str, Any]:
        """:meth:`population_view` of one name (raises NotFound)."""
        return self.population_view(self.store.get_population(name), include_ledger)

    def populations(self) -> list[dict[str, Any]]:
        """:meth:`population_view` of every name ever uploaded."""
        return [self.population_view(p) for p in self.store.list_populations()]

    # -- spending -----------------------------------------------------------------------
    def _evaluate(self, meta: DatasetMeta, entries: Sequence[LedgerEntry],
                  charges: Sequence[tuple[str, dpa.DpEvent]], cached: _Cached | None = None,
                  ) -> tuple[float, float, PopulationLedger, int]:
        """(spent before, spent after, ledger with the charges, last seq before them)."""
        cached = cached or self._entry(meta.name, meta.budget_delta)
        with cached.lock:
            self._advance(cached, entries)
            trial = copy.deepcopy(cached.ledger)
            base_seq = cached.last_seq
        before = trial.spent()
        for partition, event in charges:
            trial.add(meta.id, partition, event)
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
                    f"{_fmt(meta.budget_epsilon)} remains on dataset {meta.id} (the budget of name {meta.name!r})")
        return None

    def reserve(self, dataset_id: str, charges: Sequence[tuple[str, dpa.DpEvent]], actor: str, reason: str,
                dry_run: bool = False, kind: str = "charge", ref: str = "") -> Reservation:
        """Atomically record ``charges`` (``(partition, DpEvent)`` pairs) if they fit the budget.

        The budget is the dataset name's; the charges land in the name's ledger, tagged with this
        version's id, ``kind`` ("histogram", "warmup", "job") and ``ref`` (warm-up/job id).
        Raises :class:`BudgetExceeded` (nothing recorded) when they do not fit; its message gives the
        remaining budget. Call this BEFORE reading any private row. With ``dry_run`` nothing is
        written and nothing is raised for a charge that does not fit: the returned
        :class:`Reservation` has ``fits=False`` and a negative ``remaining``.
        """
        charges = [(str(p), e) for p, e in charges]
        if dry_run:
            meta = self.store.get_dataset(dataset_id)
            cached = self._entry(meta.name, meta.budget_delta)
            entries = self.store.ledger(meta.name, after_seq=cached.last_seq)
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
        appended = self.store.append_ledger(dataset_id, stored, actor, reason, check, kind=kind, ref=ref)
        meta = seen["meta"]
        # The trial ledger already holds our committed charges: adopt it if nothing else was
        # composed meanwhile, so the next request composes nothing.
        cached = self._entry(meta.name, meta.budget_delta)
        with cached.lock:
            if appended and cached.last_seq == seen["base_seq"] and appended[0].seq == cached.last_seq + 1:
                cached.ledger, cached.last_seq = seen["trial"], appended[-1].seq
        before, after = seen["before"], seen["after"]
        return Reservation(meta.id, after - before, before, after, meta.budget_epsilon, meta.budget_delta,
                           meta.budget_epsilon - after, False, True, [e.seq for e in appended])

    # -- budget administration ----------------------------------------------------------
    def set_budget(self, dataset_id: str, epsilon: float, delta: float | None = None) -> dict[str, Any]:
        """Set the budget of a dataset's name (old per-dataset route); returns :meth:`status`."""
        meta = self.store.get_dataset(dataset_id)
        self.set_name_budget(meta.name, epsilon, delta)
        return self.status(dataset_id)

    def set_name_budget(self, name: str, epsilon: float, delta: float | None = None) -> dict[str, Any]:
        """Set a dataset name's budget (``delta=None`` keeps the current delta) as one
        compare-and-set against its ledger; returns :meth:`population_view` with the ledger.

        Raises ValueError for an invalid budget or one below what is already spent (at the new
        delta: a smaller delta makes the same ledger cost more epsilon). Nothing another request
        writes (a charge, a noisy-count release) can undo the change, and no charge can slip in
        between the check and the write.
        """
        epsilon = float(epsilon)
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise ValueError("budget epsilon must be a positive finite number")
        pop = self.store.get_population(name)
        delta = pop.budget_delta if delta is None else float(delta)
        if not 0 < delta < 1:
            raise ValueError("budget delta must be in (0, 1)")

        def check(current: Population, entries: Sequence[LedgerEntry]) -> None:
            spent = compose_entries(PopulationLedger(delta), entries).spent()
            public = self._all_public(current)
            if epsilon < spent and not public:  # public data: spend is recorded, not limited
                raise ValueError(f"cannot set the budget of dataset {name!r} to epsilon {_fmt(epsilon)} at delta "
                                 f"{delta:g}: {_fmt(spent)} is already spent")

        updated = self.store.set_budget(name, epsilon, delta, check)
        return self.population_view(updated, include_ledger=True)

    def _all_public(self, pop: Population) -> bool:
        metas = [self.store.get_dataset(i) for i in pop.versions]
        return bool(metas) and all(m.public for m in metas)

    def reset(self, name: str, actor: str, reason: str) -> dict[str, Any]:
        """Explicitly restart accounting of a dataset name (audited; the ledger keeps every entry)."""
        if not reason.strip():
            raise ValueError("a reset needs a reason")
        self.store.reset_ledger(name, actor, reason.strip())
        return self.population(name)

    # -- DP pool sizes ------------------------------------------------------------------
    def noisy_counts(self, dataset_id: str, actor: str, reason: str = "noisy pool sizes") -> dict[str, float]:
        """DP estimates of the per-label pool sizes, in privacy units, over the declared domain.

        The first call charges the Gaussian count release on the whole dataset ("*") BEFORE the
        rows are read, then stores the noisy values as a conditional write; later calls return
        them for free (post-processing). Two processes racing on the first call may both pay;
        that over-counts spend (safe) and the first stored release wins. Every label of the
        declared domain gets a count, zeros included, so the released keys are public.
        """
        with self._cache_lock:
            lock = self._counts_locks.setdefault(dataset_id, threading.Lock())
        with lock:
            meta = self.store.get_dataset(dataset_id)
            if meta.noisy_counts is not None:
                return dict(meta.noisy_counts)
            # The event depends only on the noise scale; with no counts nothing private is touched.
            _, event = noisy_pool_sizes({}, Noise(None))
            self.reserve(dataset_id, [(WHOLE_DATASET, event)], actor, reason, kind="histogram", ref=dataset_id)
            rows = self.store.load_rows(dataset_id, units=True)
            pools = unit_pools([Example(t, lab, unit=u) for t, lab, u in rows], meta.labels)
            del rows
            counts = unit_counts(pools, meta.labels)
            noisy, released = noisy_pool_sizes(counts, Noise(None))
            if released != event:  # pragma: no cover - guards a change in noisy_pool_sizes
                raise RuntimeError("noisy_pool_sizes released a different event than was charged")
            return self.store.set_noisy_counts(dataset_id, noisy)

    # -- DP row lengths (prompt width) --------------------------------------------------
    def width_release(self, dataset_id: str, tokenizer: str, count_tokens: Callable[[str], int],
                      actor: str, reason: str = "row lengths") -> WidthRelease:
        """The DP histogram of the units' longest-row token counts in ``tokenizer`` (its id, e.g.
        the generator id) and ``count_tokens`` (its public counting function).

        Like :meth:`noisy_counts`: the first call for a (dataset version, tokenizer) charges the
        Gaussian release (:func:`aggregation.quantile.width_event`) on the whole dataset BEFORE
        the rows are read, then stores it with a conditional write; later calls are free.
        """
        with self._cache_lock:
            lock = self._width_locks.setdefault((dataset_id, tokenizer), threading.Lock())
        with lock:
            stored = self.store.get_width_release(dataset_id, tokenizer)
            if stored is not None:
                return WidthRelease.from_dict(stored)
            event = width_event()
            self.reserve(dataset_id, [(WHOLE_DATASET, event)], actor, reason, kind="width",
                         ref=f"{dataset_id} {tokenizer}")
            rows = self.store.load_rows(dataset_id, units=True)
            lengths = unit_lengths([Example(t, lab, unit=u) for t, lab, u in rows], count_tokens)
            del rows
            release, released = release_widths(lengths, Noise(None))
            del lengths
            if released != event:  # pragma: no cover - guards a change in release_widths
                raise RuntimeError("release_widths released a different event than was charged")
            return WidthRelease.from_dict(self.store.set_width_release(dataset_id, tokenizer, release.to_dict()))
