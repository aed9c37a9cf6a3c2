"""The storage contract shared by the SQLite (embedded) and Redis (scale-out) backends.

Everything the service persists goes through :class:`Store`: datasets (private rows, kept apart
from their metadata), populations (a dataset *name*: its versions share one budget and one
append-only privacy ledger, which outlives deleted versions), cached demonstration sets,
admin-created tasks, offline jobs and the append-only admin audit log.

Operations that need care are atomic read-check-write sections: :meth:`Store.append_ledger` (read
the population's ledger, let the caller's check decide whether new charges fit, append them),
:meth:`Store.set_budget` (compare-and-set against the same ledger) and
:meth:`Store.set_noisy_counts` (the first stored release wins; every kind of stored DP release is
declared in :mod:`proxy.store.releases`). Stores hold data, not policy: the checks are callables
handed in by :mod:`proxy.budget`.

Schema version 2 (this one) keys budgets and ledgers by dataset name; see docs/stores.md for the
migration of a schema-1 SQLite file (backed up first) and why a schema-1 Redis is refused.
"""

from __future__ import annotations

import secrets
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from proxy.store.releases import DpReleases


class StoreError(Exception):
    """Base class of store errors (messages never contain private text)."""


class StoreBusy(StoreError):
    """The store did not answer in time (a lock wait or a network timeout); nothing was written
    by the failed call. The HTTP layer answers 503 with ``Retry-After``."""


class NotFound(StoreError):
    """The dataset / task / job / cache entry does not exist."""


class BudgetExceeded(StoreError):
    """A charge would take a dataset past its privacy budget; nothing was recorded."""

    def __init__(self, message: str, remaining: float):
        super().__init__(message)
        self.remaining = remaining


#: Version of the storage layout written by this code (docs/stores.md).
SCHEMA_VERSION = 2


@dataclass
class DatasetMeta:
    """Metadata of one dataset version. Never holds private text.

    ``budget_epsilon``/``budget_delta`` are the budget of the dataset's *name* (population), read
    with the metadata; change them with :meth:`Store.set_budget`, never through a dataset.
    """

    id: str
    name: str
    version: int
    rows: int
    labels: list[str]  # the label domain declared at upload (public configuration)
    budget_epsilon: float
    budget_delta: float
    created_at: float
    public: bool = False
    #: DP estimates of per-label pool sizes, fixed the first time they are needed (charged).
    noisy_counts: dict[str, float] | None = None
    #: Number of privacy units (rows without a unit id are their own unit). Admin-only.
    units: int | None = None


@dataclass
class Population:
    """A dataset name: one budget and one ledger shared by all its versions (deleted ones too)."""

    name: str
    budget_epsilon: float
    budget_delta: float
    last_version: int
    created_at: float
    #: Ids of the versions that still exist (oldest first).
    versions: list[str] = field(default_factory=list)


@dataclass
class LedgerEntry:
    """One append-only ledger row: a DpEvent charged on one partition of a population.

    ``kind`` is ``"reset"`` for an admin's explicit ledger reset (event NoOp): accounting composes
    only the entries after the last reset, while the ledger keeps every entry for the audit.
    """

    seq: int  # 1, 2, 3, ... per population (dataset name), in append order
    dataset_id: str  # the version that was charged
    partition: str  # a label, or "*" for the whole dataset
    event: dict[str, Any]  # aggregation.accounting.event_to_dict(...)
    epsilon_after: float  # population's spent epsilon right after this entry
    actor: str  # who asked (admin key id, client id, job id)
    reason: str  # why (task name, job id, ...)
    created_at: float
    name: str = ""  # the population
    kind: str = "charge"  # "histogram" | "width" | "warmup" | "job" | "reset" | "charge"
    ref: str = ""  # warm-up / job id, or the task name


@dataclass
class AuditEntry:
    """One append-only admin audit record (never row text)."""

    seq: int
    time: float
    actor: str
    action: str
    target: str
    details: dict[str, Any]


class SchemaError(StoreError):
    """The backend holds a layout this code does not read (the message says what to do)."""


@dataclass
class Charge:
    """A charge to append: an event on a partition (the ledger assigns seq and time)."""

    partition: str
    event: dict[str, Any]


#: Called inside the atomic section with the charged dataset's metadata (budget of its name) and
#: the name's full current ledger; returns the spent epsilon after the new charges, or raises
#: BudgetExceeded to abort.
BudgetCheck = Callable[[DatasetMeta, Sequence[LedgerEntry]], float]
#: Called inside :meth:`Store.set_budget`'s atomic section with the population (its current
#: budget) and its full ledger; raises (ValueError) to refuse the change.
BudgetSetCheck = Callable[[Population, Sequence[LedgerEntry]], None]


#: The event stored with a reset marker (no privacy cost; dp-accounting's NoOpDpEvent as a dict).
RESET_EVENT: dict[str, Any] = {"type": "NoOpDpEvent"}


def new_dataset_id() -> str:
    """A fresh dataset id, ``ds_`` + 16 random hex digits."""
    return "ds_" + secrets.token_hex(8)


def demo_filter(key: str | None, dataset_id: str | None, task: str | None) -> tuple[str, list[str]]:
    """SQL condition for ``delete_demos`` (filters combine with AND); refuses an empty filter."""
    clauses, args = [], []
    for column, value in (("key", key), ("dataset_id", dataset_id), ("task", task)):
        if value is not None:
            clauses.append(f"{column} = ?")
            args.append(value)
    if not clauses:
        # Regenerating demonstrations costs budget: never drop the whole cache by accident.
        raise ValueError("delete_demos needs a key, a dataset id or a task")
    return " AND ".join(clauses), args


def normalise_rows(rows: Sequence[Sequence[Any]]) -> list[tuple[str, str, str | None]]:
    """``(text, label[, unit])`` rows as ``(text, label, unit or None)`` strings."""
    out = []
    for r in rows:
        unit = r[2] if len(r) > 2 else None
        out.append((str(r[0]), str(r[1]), None if unit is None else str(unit)))
    return out


def count_units(rows: Sequence[tuple[str, str, str | None]]) -> int:
    """Privacy units among normalised rows (a row without a unit id is its own unit)."""
    return sum(1 for _, _, u in rows if u is None) + len({u for _, _, u in rows if u is not None})


class StagedUpload(ABC):
    """One upload in progress (:meth:`Store.begin_upload`): ``add`` chunks, then ``commit`` (or
    ``abort``); nothing is visible before the commit (design: :mod:`proxy.store.uploads`). Not
    thread-safe: one caller drives an upload (its calls may come from different threads in turn)."""

    def __init__(self, name: str, budget_epsilon: float, budget_delta: float, public: bool,
                 labels: Sequence[str] | None):
        self.dataset_id = new_dataset_id()
        self.name = name
        self.budget_epsilon = float(budget_epsilon)
        self.budget_delta = float(budget_delta)
        self.public = bool(public)
        self.rows = 0
        self._declared = list(labels) if labels is not None else None
        self._seen: set[str] = set()
        self._units: set[str] = set()
        self._unitless = 0
        self.done = False
        #: Test hook: called with the number of rows staged so far after every chunk (lock free).
        self.on_chunk: Callable[[int], None] | None = None

    def add(self, rows: Sequence[Sequence[Any]]) -> float:
        """Stage one chunk of ``(text, label[, unit])`` rows in its own short write; returns the
        seconds it took. Chunk sizes are the caller's (``proxy.store.uploads.row_chunks``)."""
        if self.done:
            raise RuntimeError("this upload is already committed or aborted")
        norm = normalise_rows(rows)
        start = time.monotonic()
        self._write(self.rows, norm)
        took = time.monotonic() - start
        self.rows += len(norm)
        for _, label, unit in norm:
            self._seen.add(label)
            if unit is None:
                self._unitless += 1
            else:
                self._units.add(unit)
        if self.on_chunk is not None:
            self.on_chunk(self.rows)
        return took

    @property
    def units(self) -> int:
        """Privacy units staged so far (a row without a unit id is its own unit)."""
        return self._unitless + len(self._units)

    @property
    def labels(self) -> list[str]:
        """The declared label domain, else the sorted labels of the staged rows."""
        return list(self._declared) if self._declared is not None else sorted(self._seen)

    def commit(self) -> DatasetMeta:
        """Publish the staged rows as a new version of ``name`` (one short atomic step)."""
        if self.done:
            raise RuntimeError("this upload is already committed or aborted")
        meta = self._publish()
        self.done = True
        return meta

    def abort(self) -> None:
        """Delete the staged rows and the staging mark (idempotent; nothing becomes visible)."""
        if not self.done:
            self.done = True
            self._discard()

    @abstractmethod
    def _write(self, start: int, rows: list[tuple[str, str, str | None]]) -> None:
        """Store ``rows`` at positions ``start, start+1, ...`` and refresh the staging mark."""

    @abstractmethod
    def _publish(self) -> DatasetMeta:
        """Atomically: check the staging mark, assign the version, write metadata, drop the mark."""

    @abstractmethod
    def _discard(self) -> None:
        """Delete the staged rows (in chunks) and the staging mark."""


#: Warm-up states in which a warm-up still holds its deduplication key.
ACTIVE_WARMUP_STATES = ("queued", "running")


class Store(DpReleases, ABC):
    """Persistence for datasets, ledger, demonstration cache, tasks and jobs; the DP releases of
    dataset versions (noisy counts, widths, clusters) are declared in :class:`DpReleases`."""

    # -- datasets -------------------------------------------------------------------------
    @abstractmethod
    def create_dataset(self, name: str, rows: Sequence[tuple[str, ...]], budget_epsilon: float,
                       budget_delta: float, public: bool = False,
                       labels: Sequence[str] | None = None) -> DatasetMeta:
        """Store ``rows`` as ``(text, label)`` or ``(text, label, unit)`` tuples.

        A new name gets version 1 and a population with the given budget; an existing name a new
        id with version+1 and keeps its population's budget and ledger (the budget arguments are
        then ignored). ``labels`` is the declared label domain (default: the rows' sorted labels).
        Rows are written in short chunks and published at the end (:mod:`proxy.store.uploads`):
        the dataset appears whole or not at all.
        """

    @abstractmethod
    def begin_upload(self, name: str, budget_epsilon: float, budget_delta: float, public: bool = False,
                     labels: Sequence[str] | None = None) -> StagedUpload:
        """Start a staged upload (arguments as for :meth:`create_dataset`): add rows in chunks,
        then commit (or abort). Nothing is visible before the commit."""

    @abstractmethod
    def get_dataset(self, dataset_id: str) -> DatasetMeta:
        """Metadata of one dataset (raises NotFound)."""

    @abstractmethod
    def list_datasets(self) -> list[DatasetMeta]:
        """Metadata of every dataset."""

    def resolve_dataset(self, ref: str) -> DatasetMeta:
        """Dataset by id, else the newest version with that name (raises NotFound)."""
        try:
            return self.get_dataset(ref)
        except NotFound:
            versions = [m for m in self.list_datasets() if m.name == ref]
            if not versions:
                raise
        return max(versions, key=lambda m: m.version)

    @abstractmethod
    def load_rows(self, dataset_id: str, units: bool = False) -> list[tuple[Any, ...]]:
        """The private rows as ``(text, label)`` (``(text, label, unit or None)`` with ``units``).
        Call only after the spend was recorded."""

    @abstractmethod
    def delete_dataset(self, dataset_id: str) -> None:
        """Remove rows, metadata and cached demonstrations; the name's ledger and budget stay."""

    # -- populations (dataset names) ------------------------------------------------------
    @abstractmethod
    def get_population(self, name: str) -> Population:
        """Budget and versions of a dataset name (raises NotFound)."""

    @abstractmethod
    def list_populations(self) -> list[Population]:
        """Every name ever uploaded (including names whose versions are all deleted)."""

    @abstractmethod
    def set_budget(self, name: str, epsilon: float, delta: float, check: BudgetSetCheck) -> Population:
        """Atomically (compare-and-set against the ledger): call ``check`` with the current
        population and ledger, then write the new budget. Returns the updated population."""

    # -- ledger -----------------------------------------------------------------------------
    @abstractmethod
    def ledger(self, name: str, after_seq: int = 0) -> list[LedgerEntry]:
        """Ledger entries of a dataset name with ``seq > after_seq`` in order (``[]`` if none)."""

    @abstractmethod
    def append_ledger(self, dataset_id: str, charges: Sequence[Charge], actor: str, reason: str,
                      check: BudgetCheck, kind: str = "charge", ref: str = "") -> list[LedgerEntry]:
        """Atomically: read the ledger of the dataset's name, call ``check``, append ``charges``
        (all or nothing). Every new entry gets ``epsilon_after`` = the value ``check`` returned.
        """

    @abstractmethod
    def reset_ledger(self, name: str, actor: str, reason: str) -> LedgerEntry:
        """Append a ``kind="reset"`` marker to a name's ledger (accounting restarts after it)."""

    # -- audit log ------------------------------------------------------------------------
    @abstractmethod
    def append_audit(self, actor: str, action: str, target: str, details: dict[str, Any]) -> AuditEntry:
        """Append one admin audit record (never row text)."""

    @abstractmethod
    def audit(self, limit: int = 100, before: int | None = None) -> list[AuditEntry]:
        """Newest-first audit records with ``seq < before`` (all when ``before`` is None)."""

    # -- demonstration cache ------------------------------------------------------------
    @abstractmethod
    def get_demos(self, key: str) -> dict[str, Any] | None:
        """A cached demonstration set (JSON-able dict) or None."""

    @abstractmethod
    def put_demos(self, key: str, dataset_id: str, task: str, payload: dict[str, Any]) -> None:
        """Cache a demonstration set under ``key``."""

    @abstractmethod
    def delete_demos(self, key: str | None = None, dataset_id: str | None = None, task: str | None = None) -> int:
        """Drop cached sets by key, by dataset or by task; returns how many were dropped."""

    # -- tasks created through the admin API --------------------------------------------
    @abstractmethod
    def put_task(self, name: str, spec: dict[str, Any]) -> None: ...

    @abstractmethod
    def get_task(self, name: str) -> dict[str, Any] | None: ...

    @abstractmethod
    def list_tasks(self) -> dict[str, dict[str, Any]]: ...

    @abstractmethod
    def delete_task(self, name: str) -> bool: ...

    # -- client keys created through the admin API ---------------------------------------
    @abstractmethod
    def add_client_key(self, name: str, record: dict[str, Any]) -> bool:
        """Store a client key record (its SHA-256, never the key); False if ``name`` exists."""

    @abstractmethod
    def list_client_keys(self) -> dict[str, dict[str, Any]]:
        """Every stored client key record by name."""

    @abstractmethod
    def delete_client_key(self, name: str) -> bool:
        """Remove a client key; False if there was none."""

    # -- jobs ---------------------------------------------------------------------------
    @abstractmethod
    def put_job(self, job_id: str, record: dict[str, Any]) -> None: ...

    @abstractmethod
    def get_job(self, job_id: str) -> dict[str, Any] | None: ...

    @abstractmethod
    def list_jobs(self) -> list[dict[str, Any]]: ...

    @abstractmethod
    def update_job(self, job_id: str, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into the job record atomically; returns the new record."""

    # -- warm-ups (demonstration-set generations as resources) ------------------------
    @abstractmethod
    def create_warmup(self, record: dict[str, Any], dedupe: str | None = None) -> tuple[dict[str, Any], bool]:
        """Store a new warm-up record (``record["id"]``, ``record["state"]``) unless one with the same
        ``dedupe`` key is still active (queued or running); atomically. Returns ``(record, created)``:
        the stored new record, or the active one that made this one unnecessary."""

    @abstractmethod
    def get_warmup(self, warmup_id: str) -> dict[str, Any] | None: ...

    @abstractmethod
    def list_warmups(self, limit: int = 200) -> list[dict[str, Any]]:
        """The newest ``limit`` warm-up records, newest first."""

    @abstractmethod
    def update_warmup(self, warmup_id: str, expect: Sequence[str] | None = None, **fields: Any) -> dict[str, Any] | None:
        """Merge ``fields`` into the record atomically if its state is in ``expect`` (any state when
        None); returns the new record, or None when the state did not match. Raises NotFound."""

    @abstractmethod
    def put_blob(self, key: str, data: bytes) -> None:
        """Store a job result (synthetic JSONL, adapter archive)."""

    @abstractmethod
    def get_blob(self, key: str) -> bytes | None: ...

    # -- operations ---------------------------------------------------------------------
    @abstractmethod
    def ping(self) -> bool:
        """Whether the backend is reachable (readiness)."""

    def close(self) -> None:
        """Release connections."""
