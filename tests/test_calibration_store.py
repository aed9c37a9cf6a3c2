"""Calibrations cached in the store (issue 14, part 4): a second process plans at once, and a
wrong stored value is caught by the check on the real event (the result stays an upper bound)."""

from __future__ import annotations

import json

import pytest

import aggregation.calibration as calibration
from aggregation import accounting
from aggregation.calibration import calibrate_noise, calibration_key, event_for, rate_up
from proxy.serving.calibrations import StoreCalibrationCache, _blob_key

ARGS = dict(family="gaussian", block=1, q=0.02, tokens=4, shots=1, target=2.0, delta=1e-5)


@pytest.fixture
def solves(monkeypatch):
    calls = []
    real = calibration._solve

    def counting(*a, **kw):
        calls.append(a)
        return real(*a, **kw)

    monkeypatch.setattr(calibration, "_solve", counting)
    return calls


def _epsilon(sigma: float) -> float:
    a = ARGS
    return accounting.epsilon_of([event_for("gaussian", sigma, a["block"], a["q"], a["tokens"], a["shots"])], a["delta"])


def test_second_process_reuses_the_stored_calibration(store, solves):
    first = calibrate_noise(cache=StoreCalibrationCache(store), **ARGS)
    assert len(solves) == 1 and _epsilon(first) <= ARGS["target"]
    # Another process: its own empty LRU, the same store.
    second = calibrate_noise(cache=StoreCalibrationCache(store), **ARGS)
    assert second == first and len(solves) == 1
    # A different public input is a different entry.
    calibrate_noise(cache=StoreCalibrationCache(store), **{**ARGS, "target": 3.0})
    assert len(solves) == 2


def test_a_wrong_stored_value_is_recalibrated(store, solves):
    a = ARGS
    key = calibration_key("gaussian", a["block"], rate_up(a["q"]), a["tokens"], a["shots"], a["delta"], a["target"])
    # Far too little noise under the right key (a tampered or stale store).
    store.put_blob(_blob_key(key), json.dumps({"key": key, "value": 0.05}).encode())
    sigma = calibrate_noise(cache=StoreCalibrationCache(store), **a)
    assert len(solves) == 1 and sigma > 0.05 and _epsilon(sigma) <= a["target"]
    # Garbage and foreign entries are misses, not failures.
    store.put_blob(_blob_key(key), b"not json")
    assert StoreCalibrationCache(store).get(key) is None
    store.put_blob(_blob_key(key), json.dumps({"key": "other", "value": 9.0}).encode())
    assert StoreCalibrationCache(store).get(key) is None


def test_store_failures_are_misses(tmp_path):
    class Broken:
        def get_blob(self, key):
            raise OSError("down")

        def put_blob(self, key, data):
            raise OSError("down")

    cache = StoreCalibrationCache(Broken())  # type: ignore[arg-type]
    assert cache.get("k") is None
    cache.put("k", 1.5)  # kept locally even though sharing failed
    assert cache.get("k") == 1.5
