"""Calibrated noise parameters kept in the store, so every replica and worker reuses them.

Calibrating sigma for a target epsilon searches the accountant (seconds); its result depends only on
public inputs (event family, block length, sampling rate rounded up, tokens, shots, delta, target:
:func:`aggregation.calibration.calibration_key`). This cache answers from the process's LRU first,
then from the store (a blob ``calibration/<sha256 of the key>``). Whatever it returns is checked by
:func:`aggregation.calibration.calibrate_noise` against the real event before use, so a stale or
tampered entry can cost time, never privacy: the result stays an upper bound on epsilon.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math

from aggregation.calibration import LruCalibrationCache
from proxy.store.base import Store

log = logging.getLogger("dpicl.calibration")
PREFIX = "calibration/"


def _blob_key(key: str) -> str:
    return PREFIX + hashlib.sha256(key.encode()).hexdigest()


class StoreCalibrationCache:
    """:class:`aggregation.calibration.CalibrationCache` over this process's LRU and the store."""

    def __init__(self, store: Store, local: LruCalibrationCache | None = None):
        self.store = store
        self.local = local if local is not None else LruCalibrationCache()

    def get(self, key: str) -> float | None:
        value = self.local.get(key)
        if value is not None:
            return value
        try:
            raw = self.store.get_blob(_blob_key(key))
            if raw is None:
                return None
            entry = json.loads(raw)
            # The full key is stored too: a hash collision (or a foreign blob) is not a hit.
            value = float(entry["value"]) if entry.get("key") == key else None
        except Exception as exc:  # noqa: BLE001 - a cache miss, never a failure
            log.warning("calibration cache read failed: %s", type(exc).__name__)
            return None
        if value is None or not (math.isfinite(value) and value > 0):
            return None
        self.local.put(key, value)
        return value

    def put(self, key: str, value: float) -> None:
        self.local.put(key, value)
        try:
            self.store.put_blob(_blob_key(key), json.dumps({"key": key, "value": float(value)}).encode())
        except Exception as exc:  # noqa: BLE001 - the value is still used; only sharing failed
            log.warning("calibration cache write failed: %s", type(exc).__name__)
