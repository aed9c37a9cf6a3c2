"""Calibrating a demonstration plan's noise for a target epsilon, with a cache.

A plan's noise parameter is a deterministic function of public inputs (mechanism family, block
length, sampling rate, tokens, shots, delta, target), so it can be cached under those inputs: a
repeated dry run or warm-up answers without searching again. Every answer stays an upper bound:

* the sampling rate is rounded *up* to a grid (:func:`rate_up`) before it is used as a key or
  calibrated for. More sampling means more epsilon at a given noise, so noise calibrated for the
  rounded rate is enough for the real one. The event the ledger records keeps the real rate.
* whatever the cache returns (it may live in a shared store), the event on the *real* rate is
  checked against the target at the ledger's discretisation before it is used; a value that
  fails is recalibrated (:func:`calibrate_noise`).
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from typing import Literal, Protocol

import dp_accounting as dpa

from aggregation import accounting
from aggregation.mechanisms import demonstration_event

#: Bump when the meaning of a cached value changes (event shapes, accountant settings).
KEY_VERSION = 2  # 2: bounded-range blocks accounted by PLD (best of PLD and zCDP)
#: Sampling rates are rounded up to the next power of this (at most 0.5 % more sampling).
RATE_STEP = 1.005

#: Event families: ``gaussian`` caches sigma; ``bounded_range`` caches the per-token epsilon of
#: the exponential and public-prior mechanisms (the same event, see ``demonstration_event``).
Family = Literal["gaussian", "bounded_range"]


class CalibrationCache(Protocol):
    """Where calibrated noise parameters are kept; keys are plain strings (JSON arrays)."""

    def get(self, key: str) -> float | None:
        """The stored value, or ``None``."""

    def put(self, key: str, value: float) -> None:
        """Store ``value`` under ``key``."""


class LruCalibrationCache:
    """An in-process, thread-safe least-recently-used cache (the default)."""

    def __init__(self, maxsize: int = 1024):
        self.maxsize = maxsize
        self._data: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> float | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: str, value: float) -> None:
        with self._lock:
            self._data[key] = float(value)
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class NoCalibrationCache:
    """Never stores anything (every plan calibrates afresh)."""

    def get(self, key: str) -> float | None:
        return None

    def put(self, key: str, value: float) -> None:
        return None


#: The process-wide default cache of :func:`aggregation.fewshot.plan_demonstrations`.
DEFAULT_CACHE = LruCalibrationCache()


def rate_up(q: float) -> float:
    """``q`` rounded up to the grid ``RATE_STEP ** n`` (never below ``q``, never above 1)."""
    if not 0 < q <= 1:
        raise ValueError("sampling rate q must be in (0, 1]")
    n = math.ceil(math.log(q) / math.log(RATE_STEP) - 1e-9)
    up = RATE_STEP ** n
    if up < q:  # floating point: make sure the rounding went up
        up = RATE_STEP ** (n + 1)
    return min(1.0, up)


def calibration_key(family: Family, block: int, q: float, tokens: int, shots: int, delta: float,
                    target: float) -> str:
    """The cache key: a JSON array of the public inputs (``q`` already rounded up)."""
    return json.dumps(["dpicl-calibration", KEY_VERSION, family, int(block), float(q), int(tokens), int(shots),
                       float(delta), float(target), accounting.PLD_DISCRETIZATION])


def event_for(family: Family, value: float, block: int, q: float, tokens: int, shots: int) -> dpa.DpEvent:
    """The event of ``shots`` demonstrations with noise parameter ``value`` (sigma or eps/token)."""
    if family == "gaussian":
        single = demonstration_event("block", q, tokens, sigma=value, block_tokens=block)
    elif family == "bounded_range":
        single = demonstration_event("block", q, tokens, epsilon_per_token=value, block_tokens=block)
    else:
        raise ValueError(f"unknown event family {family!r}")
    return single if shots == 1 else dpa.SelfComposedDpEvent(single, shots)


def _solve(family: Family, block: int, q_search: float, q: float, tokens: int, shots: int, target: float,
           delta: float) -> float:
    """Search on rate ``q_search``; the final check at the ledger's discretisation uses rate ``q``."""
    if family == "gaussian":
        return accounting.calibrate_sigma(
            lambda s: event_for(family, s, block, q_search, tokens, shots), target, delta,
            final_event=lambda s: event_for(family, s, block, q, tokens, shots))
    # The per-token epsilon falls as noise grows; calibrate its inverse as a noise multiplier.
    inv = accounting.calibrate_sigma(
        lambda s: event_for(family, 1.0 / s, block, q_search, tokens, shots), target, delta,
        final_event=lambda s: event_for(family, 1.0 / s, block, q, tokens, shots))
    return 1.0 / inv


def _meets(family: Family, value: float, block: int, q: float, tokens: int, shots: int, target: float,
           delta: float) -> bool:
    if not (isinstance(value, float) and math.isfinite(value) and value > 0):
        return False
    return accounting.epsilon_of([event_for(family, value, block, q, tokens, shots)], delta) <= target


def calibrate_noise(
    family: Family,
    block: int,
    q: float,
    tokens: int,
    shots: int,
    target: float,
    delta: float,
    cache: CalibrationCache | None = None,
) -> float:
    """Noise parameter so that ``shots`` demonstrations at the real rate ``q`` cost at most ``target``.

    Gaussian: the noise multiplier sigma; ``bounded_range``: the per-token epsilon. Looks the rate rounded
    up in ``cache`` first (default: the in-process LRU), calibrates on a miss, and always checks
    the real event at the ledger's discretisation before returning.
    """
    cache = DEFAULT_CACHE if cache is None else cache
    q_up = rate_up(q)
    key = calibration_key(family, block, q_up, tokens, shots, delta, target)
    cached = cache.get(key)
    value = float(cached) if cached is not None else None
    if value is not None and _meets(family, value, block, q, tokens, shots, target, delta):
        return value
    # Search on the rounded-up rate (the value is cached for every rate of its grid cell), with the
    # final check at the ledger's discretisation on the real event. A later rate of the same cell
    # is checked again on its own event when it reads the cache.
    # (calibrate_sigma's last step is that check: it steps the value up until the real event meets
    # the target as the ledger computes it.)
    value = _solve(family, block, q_up, q, tokens, shots, target, delta)
    cache.put(key, value)
    return value
