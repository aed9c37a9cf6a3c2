"""The DP row-length release (aggregation.quantile) and its charged, once-per-version use
(BudgetService.width_release): closed-form values, noise matching the event, privacy order."""

from __future__ import annotations

import dp_accounting as dpa
import numpy as np
import pytest

from aggregation.mechanisms import Noise
from aggregation.prompts import Example
from aggregation.quantile import (WIDTH_GRID, WIDTH_SIGMA, WidthRelease, bin_of, derived_width, length_histogram,
                                  release_widths, unit_lengths, width_event)
from proxy.budget import BudgetService
from proxy.store import BudgetExceeded

DELTA = 1e-5


class NoNoise(Noise):
    """Zero draws: the release then equals the exact histogram (closed-form checks only)."""

    def normal(self, scale: float, size: int) -> np.ndarray:
        return np.zeros(size)


def words(text: str) -> int:
    return len(text.split())


def test_grid_is_public_and_geometric():
    assert WIDTH_GRID[0] == 8 and WIDTH_GRID[-1] == 1024 and len(WIDTH_GRID) == 29
    assert all(b > a for a, b in zip(WIDTH_GRID, WIDTH_GRID[1:]))
    assert all(b / a <= 1.25 for a, b in zip(WIDTH_GRID, WIDTH_GRID[1:]))
    assert [bin_of(n) for n in (0, 8, 9, 10, 1024, 1025, 10**6)] == [0, 0, 1, 1, 28, 29, 29]


def test_one_value_per_unit_its_longest_row():
    rows = [Example("a b c", "x", unit="u1"), Example("a b c d e f", "y", unit="u1"),
            Example("one two", "x"), Example("x  \n y   z w", "x")]
    assert unit_lengths(rows, words) == [6, 2, 4]  # u1's longest; rows without a unit alone


def test_quantile_and_share_closed_form():
    lengths = [10] * 100 + [500] * 5
    release, event = release_widths(lengths, NoNoise())
    assert event == dpa.GaussianDpEvent(WIDTH_SIGMA) == width_event()
    assert release.bins == tuple(float(x) for x in length_histogram(lengths))
    assert release.total() == 105
    assert release.quantile(0.95) == 10  # 5 above 10 <= 0.05 * 105
    assert release.share_within(10) == pytest.approx(100 / 105)
    assert release.share_within(9) == 0.0 and release.share_within(5000) == 1.0
    six = release_widths([10] * 100 + [500] * 6, NoNoise())[0]
    assert six.quantile(0.95) == 512  # 6 above 10 > 5.3: the next edge holding them
    assert six.quantile(0.9) == 10
    assert release_widths([], NoNoise())[0].quantile() == 1024  # nothing known: the widest
    assert WidthRelease.from_dict(release.to_dict()) == release


def test_release_noise_matches_its_event():
    noise = Noise(7)
    draws = np.concatenate([np.asarray(release_widths([], noise)[0].bins) for _ in range(200)])
    assert draws.shape == (200 * (len(WIDTH_GRID) + 1),)
    assert abs(draws.mean()) < 3 * WIDTH_SIGMA / np.sqrt(draws.size)
    assert draws.std() == pytest.approx(WIDTH_SIGMA, rel=0.05)
    with pytest.raises(ValueError):
        release_widths([1], noise, sigma=0.0)


def test_derived_width_closed_form():
    assert derived_width(public_tokens=30, example_tokens=8, shots_per_subset=2, quantile=40) == 30 + 2 * 48
    assert derived_width(2, 1, 1, 8) == 16  # never below what a generation config accepts
    assert derived_width(100, 10, 100, 1024) == 32_768


ROWS = [(f"row {i} " + "w " * (3 if i % 10 else 40), "loc") for i in range(60)]


def test_width_release_charged_before_reading_and_once(store):
    svc = BudgetService(store)
    m = store.create_dataset("d", ROWS, 10.0, DELTA)
    calls = []
    real_load, real_append = store.load_rows, store.append_ledger
    store.load_rows = lambda *a, **k: calls.append("load") or real_load(*a, **k)
    store.append_ledger = lambda *a, **k: calls.append("append") or real_append(*a, **k)
    release = svc.width_release(m.id, "local:tok", words, "admin")
    assert calls == ["append", "load"]
    (entry,) = store.ledger(m.name)
    assert (entry.partition, entry.kind, entry.event) == ("*", "width", {"type": "GaussianDpEvent",
                                                                          "noise_multiplier": WIDTH_SIGMA})
    exact = length_histogram(unit_lengths([Example(t, lab) for t, lab in ROWS], words))
    assert release.bins != tuple(float(x) for x in exact)  # noise was added
    calls.clear()
    assert svc.width_release(m.id, "local:tok", words, "admin") == release  # later calls are free
    assert calls == [] and len(store.ledger(m.name)) == 1
    svc.width_release(m.id, "other-tokenizer", words, "admin")  # another tokenizer: its own release
    assert len(store.ledger(m.name)) == 2


def test_width_release_refused_reads_nothing(store):
    svc = BudgetService(store)
    m = store.create_dataset("d", ROWS, 0.01, DELTA)
    store.load_rows = lambda *a, **k: pytest.fail("rows read although the budget refused")
    with pytest.raises(BudgetExceeded):
        svc.width_release(m.id, "local:tok", words, "admin")
    assert store.ledger(m.name) == [] and store.get_width_release(m.id, "local:tok") is None
