"""A daemon thread that marks held work items (jobs, warm-ups) alive in the store.

Replicas and workers treat an item whose ``heartbeat_at`` went stale as failed (its process died),
so whoever holds an item refreshes it every few seconds until it lets go.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger("dpicl.heartbeat")


class Heartbeat:
    """Calls ``beat(item_id)`` for every held id each ``interval`` seconds on a daemon thread."""

    def __init__(self, beat: Callable[[str], None], interval: float, what: str):
        self.beat = beat
        self.interval = interval
        self.what = what
        self.ids: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"dpicl-{what}-heartbeat", daemon=True)
        self._thread.start()

    def add(self, item_id: str) -> None:
        """Start refreshing ``item_id``."""
        with self._lock:
            self.ids.add(item_id)

    def discard(self, item_id: str) -> None:
        """Stop refreshing ``item_id``."""
        with self._lock:
            self.ids.discard(item_id)

    def held(self) -> list[str]:
        """The ids refreshed now."""
        with self._lock:
            return list(self.ids)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for item_id in self.held():
                try:
                    self.beat(item_id)
                except Exception as exc:  # noqa: BLE001 - keep beating the others; log the type only
                    log.warning("heartbeat of %s %s failed: %s", self.what, item_id, type(exc).__name__)

    def stop(self, join: bool = False) -> None:
        """Stop the thread (and wait for it with ``join``)."""
        self._stop.set()
        if join:
            self._thread.join(timeout=self.interval + 5)
