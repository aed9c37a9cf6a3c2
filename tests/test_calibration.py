"""Calibration cache: keys are public inputs, values stay upper bounds, a bad value is never used."""

import json
import math

import pytest

from aggregation import accounting, calibration
from aggregation.calibration import (
    LruCalibrationCache,
    NoCalibrationCache,
    calibrate_noise,
    calibration_key,
    event_for,
    rate_up,
)
from aggregation.fewshot import GenerationConfig, plan_demonstrations


@pytest.mark.parametrize("q", [1e-5, 0.0007, 0.013, 0.2, 0.5, 0.9999, 1.0])
def test_rates_are_rounded_up_by_at_most_one_grid_step(q):
    up = rate_up(q)
    assert q <= up <= min(1.0, q * calibration.RATE_STEP * (1 + 1e-12))
    assert rate_up(up) == up  # grid points map to themselves


def test_nearby_rates_share_a_key_and_keys_are_plain_json():
    grid = rate_up(0.02)
    a = calibration_key("gaussian", 1, rate_up(grid * 0.999), 20, 1, 1e-5, 4.0)
    b = calibration_key("gaussian", 1, rate_up(grid * 0.9995), 20, 1, 1e-5, 4.0)
    assert a == b
    assert isinstance(json.loads(a), list)
    others = [calibration_key("bounded_range", 1, rate_up(0.02), 20, 1, 1e-5, 4.0),
              calibration_key("gaussian", 2, rate_up(0.02), 20, 1, 1e-5, 4.0),
              calibration_key("gaussian", 1, rate_up(0.03), 20, 1, 1e-5, 4.0),
              calibration_key("gaussian", 1, rate_up(0.02), 21, 1, 1e-5, 4.0),
              calibration_key("gaussian", 1, rate_up(0.02), 20, 2, 1e-5, 4.0),
              calibration_key("gaussian", 1, rate_up(0.02), 20, 1, 1e-6, 4.0),
              calibration_key("gaussian", 1, rate_up(0.02), 20, 1, 1e-5, 4.5)]
    assert len({a, *others}) == 8


class CountingCache(LruCalibrationCache):
    def __init__(self):
        super().__init__()
        self.gets = self.hits = 0

    def get(self, key):
        self.gets += 1
        value = super().get(key)
        self.hits += value is not None
        return value


def test_a_repeated_plan_hits_the_cache_and_records_the_real_rate(monkeypatch):
    solves = []
    real = calibration._solve
    monkeypatch.setattr(calibration, "_solve", lambda *a: solves.append(a) or real(*a))
    cache = CountingCache()
    config = GenerationConfig(mode="block", block_tokens=3, num_subsets=5, shots_per_subset=2, max_tokens=9, epsilon=3.0)
    n1 = 10 / rate_up(10 / 733.0)  # a pool estimate whose rate is a grid point
    first = plan_demonstrations(config, {"a": 1}, {"a": n1}, 1e-5, cache=cache)
    assert len(solves) == 1 and cache.hits == 0 and len(cache) == 1
    # A slightly larger DP pool estimate rounds up to the same grid rate: no new search.
    second = plan_demonstrations(config, {"a": 1}, {"a": n1 + 1.0}, 1e-5, cache=cache)
    assert len(solves) == 1 and cache.hits == 1
    assert second.labels["a"].sigma == first.labels["a"].sigma
    # The ledger sees the real rate, and the real event meets the target at its discretisation.
    for plan, n in ((first, n1), (second, n1 + 1.0)):
        lp = plan.labels["a"]
        assert lp.q == 10 / n and _rate_of(lp.event) == 10 / n
        assert accounting.epsilon_of([lp.event], 1e-5) <= 3.0


def _rate_of(event):
    while not hasattr(event, "sampling_probability"):
        event = getattr(event, "event", None) or event.events[0]
    return event.sampling_probability


@pytest.mark.parametrize("family", ["gaussian", "bounded_range"])
def test_a_poisoned_cache_value_is_never_used(family):
    """A store-backed cache may return anything; too little noise must be caught by the re-check."""
    q, block, tokens, shots, target, delta = 0.01, 1, 10, 1, 2.0, 1e-5
    honest = calibrate_noise(family, block, q, tokens, shots, target, delta, NoCalibrationCache())
    cache = LruCalibrationCache()
    key = calibration_key(family, block, rate_up(q), tokens, shots, delta, target)
    bad = honest * 0.5 if family == "gaussian" else honest * 2.0  # less noise either way
    for poison in (bad, -1.0, math.nan, math.inf):
        cache.put(key, poison)
        value = calibrate_noise(family, block, q, tokens, shots, target, delta, cache)
        assert accounting.epsilon_of([event_for(family, value, block, q, tokens, shots)], delta) <= target
        assert value == pytest.approx(honest, rel=0.01)


@pytest.mark.parametrize("family", ["gaussian", "bounded_range"])
@pytest.mark.parametrize("q", [0.004, 0.0203, 0.2])
def test_calibration_meets_and_nearly_reaches_the_target(family, q):
    target, delta = 4.0, 1e-5
    value = calibrate_noise(family, 4, q, 12, 2, target, delta, NoCalibrationCache())
    eps = accounting.epsilon_of([event_for(family, value, 4, q, 12, 2)], delta)
    assert eps <= target
    assert eps > target * 0.97  # the rounding of q and the search cost little
