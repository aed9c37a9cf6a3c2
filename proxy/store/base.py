"""The storage contract shared by the SQLite (embedded) and Redis (scale-out) backends.

Everything the service persists goes through :class:`Store`: datasets (private rows, kept apart
from their metadata), the append-only privacy ledger, cached demonstration sets, admin-created
tasks and offline jobs. The one operation that needs care is :meth:`Store.append_ledger`: it must
read the dataset's ledger, let the caller decide (with the accountant) whether the new charges fit
the budget, and append them, all atomically with respect to every other process using the store.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Sequence


class StoreError(Exception):
    """Base class of store errors (messages never contain private text)."""


class NotFound(StoreError):
    """The dataset / task / job / cache entry does not exist."""


class BudgetExceeded(StoreError):
    """A charge would take a dataset past its privacy budget; nothing was recorded."""

    def __init__(self, message: str, remaining: float):
        super().__init__(message)
        self.remaining = remaining


@dataclass
class DatasetMeta:
    """Public metadata of a dataset. Never holds private text."""

    id: str
    name: str
    version: int
    rows: int
    labels: list[str]
    budget_epsilon: float
    budget_delta: float
    created_at: float
    public: bool = False
    #: DP estimates of per-label pool sizes, fixed the first time they are needed (charged).
    noisy_counts: dict[str, float] | None = None


@dataclass
class LedgerEntry:
    """One append-only ledger row: a DpEvent charged on one partition of a dataset."""

    seq: int  # 1, 2, 3, ... per dataset, in append order
    dataset_id: str
    partition: str  # a label, or "*" for the whole dataset
    event: dict[str, Any]  # aggregation.accounting.event_to_dict(...)
    epsilon_after: float  # dataset's spent epsilon right after this entry
    actor: str  # who asked (admin key id, client id, job id)
    reason: str  # why (task name, job id, ...)
    created_at: float


@dataclass
class Charge:
    """A charge to append: an event on a partition (the ledger assigns seq and time)."""

    partition: str
    event: dict[str, Any]


#: Called inside the atomic section with the dataset's full current ledger and its metadata;
#: returns the spent epsilon after the new charges, or raises BudgetExceeded to abort.
BudgetCheck = Callable[[DatasetMeta, Sequence[LedgerEntry]], float]


class Store(ABC):
    """Persistence for datasets, ledger, demonstration cache, tasks and jobs."""

    # -- datasets -------------------------------------------------------------------------
    @abstractmethod
    def create_dataset(self, name: str, rows: Sequence[tuple[str, str]], budget_epsilon: float,
                       budget_delta: float, public: bool = False) -> DatasetMeta:
        """Store ``rows`` as ``(text, label)`` pairs; a new name gets version 1, an existing name
        a new id with version+1. Returns the metadata."""

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
    def load_rows(self, dataset_id: str) -> list[tuple[str, str]]:
        """The private rows. Call only after the spend was recorded."""

    @abstractmethod
    def delete_dataset(self, dataset_id: str) -> None:
        """Remove rows, metadata and cached demonstrations; the ledger stays."""

    @abstractmethod
    def update_dataset(self, meta: DatasetMeta) -> None:
        """Persist changed metadata (budget, noisy counts, public flag)."""

    # -- ledger -----------------------------------------------------------------------------
    @abstractmethod
    def ledger(self, dataset_id: str, after_seq: int = 0) -> list[LedgerEntry]:
        """Ledger entries with ``seq > after_seq`` in order (works for deleted datasets too)."""

    @abstractmethod
    def append_ledger(self, dataset_id: str, charges: Sequence[Charge], actor: str, reason: str,
                      check: BudgetCheck) -> list[LedgerEntry]:
        """Atomically: read the ledger, call ``check``, append ``charges`` (all or nothing).

        Every charge's entry gets ``epsilon_after`` = the value ``check`` returned.
        """

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
