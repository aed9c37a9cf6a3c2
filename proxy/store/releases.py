"""The stored DP releases of a dataset version: the part of the :class:`proxy.store.base.Store`
contract that keeps mechanism outputs, charged once and reused for free afterwards.

Three kinds, each DP output (or public) and never private text: the noisy label counts
(:meth:`DpReleases.set_noisy_counts`, in the dataset's metadata), the row-length releases per
tokenizer and the per-label cluster releases (both :mod:`proxy.store.keyed_releases`).
For every kind the first stored release wins: two processes that raced both paid (over-counting,
which is safe) and both go on with the one that was kept. Deleting a dataset version deletes its
releases. The backends implement the methods (the keyed ones in the mixins of that module).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class DpReleases(ABC):
    """Abstract storage of the DP releases of dataset versions (first release wins)."""

    @abstractmethod
    def set_noisy_counts(self, dataset_id: str, counts: dict[str, float]) -> dict[str, float]:
        """Store the DP label counts unless some are stored already (first release wins).

        Returns the stored counts: ``counts`` if this call stored them, else the earlier ones.
        """

    @abstractmethod
    def get_width_release(self, dataset_id: str, key: str) -> dict[str, Any] | None:
        """The DP row-length release of a dataset version for tokenizer ``key`` (None if none yet)."""

    @abstractmethod
    def set_width_release(self, dataset_id: str, key: str, release: dict[str, Any]) -> dict[str, Any]:
        """Store the release for ``key`` unless one is stored (first wins); returns the stored one."""

    @abstractmethod
    def get_cluster_release(self, dataset_id: str, key: str) -> dict[str, Any] | None:
        """The cluster release (centroids, DP sizes; never members) of ``key`` on dataset version
        ``dataset_id``, or None if none yet."""

    @abstractmethod
    def set_cluster_release(self, dataset_id: str, key: str, release: dict[str, Any]) -> dict[str, Any]:
        """Store ``release`` unless one is stored for ``key`` (first wins); returns the stored one.
        Raises :class:`proxy.store.base.NotFound` when the dataset version does not exist."""
