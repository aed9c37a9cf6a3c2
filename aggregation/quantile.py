"""A DP release of the privacy units' row lengths, and the prompt width derived from it.

Noise, sampling and accounting side by side (docs/privacy.md, "The prompt width"):

* value per unit: the token count of its longest row (a function of its own rows only, so adding
  or removing a unit adds or removes one value);
* release: the histogram of those values over a PUBLIC grid of widths (:data:`WIDTH_GRID`, 8 to
  1024 tokens in steps of 2^(1/4), one bin above the last edge), each bin plus Gaussian noise of
  std :data:`WIDTH_SIGMA`. One unit sits in one bin: L2 sensitivity 1 under add/remove, so the
  event is ``GaussianDpEvent(WIDTH_SIGMA)`` (charged once per dataset version and tokenizer on the
  whole dataset), which dp-accounting's PLD accountant composes exactly with the rest of the ledger;
* post-processing only: the quantile (:meth:`WidthRelease.quantile`), the share of units that fit
  a width (:meth:`WidthRelease.share_within`) and the derived prompt width (:func:`derived_width`).

No sampling: every unit is counted once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import dp_accounting as dpa
import numpy as np

from aggregation.mechanisms import Noise
from aggregation.prompts import Example
from aggregation.units import group_units

#: Public candidate widths (tokens): 8 * 2^(i/4) rounded, 8..1024 (29 edges). A released quantile
#: over-shoots the true one by at most one step (19 %; up to 25 % where rounding bites, 8..16).
WIDTH_GRID: tuple[int, ...] = tuple(sorted({round(8 * 2 ** (i / 4)) for i in range(29)}))
#: Noise std of every bin of the length histogram (public; the same scale as the label counts).
WIDTH_SIGMA = 20.0
#: The released quantile: the share of units whose longest row a derived width is meant to fit.
WIDTH_QUANTILE = 0.95
#: Bounds of a prompt width (GenerationConfig accepts 16..32768).
MIN_WIDTH, MAX_WIDTH = 16, 32_768


def width_event(sigma: float = WIDTH_SIGMA) -> dpa.DpEvent:
    """The event of one length-histogram release (charge it on the whole dataset)."""
    return dpa.GaussianDpEvent(sigma)


def unit_lengths(rows: Sequence[Example], count_tokens: Callable[[str], int]) -> list[int]:
    """One value per privacy unit: the token count of its longest row, as the prompt writes it
    (on one line). A unit's value depends on its own rows only."""
    return [max(count_tokens(" ".join(r.text.split())) for r in unit) for unit in group_units(rows)]


def bin_of(length: int, grid: Sequence[int] = WIDTH_GRID) -> int:
    """Index of the bin holding ``length``: bin i is (grid[i-1], grid[i]]; the last is > grid[-1]."""
    for i, edge in enumerate(grid):
        if length <= edge:
            return i
    return len(grid)


def length_histogram(lengths: Iterable[int], grid: Sequence[int] = WIDTH_GRID) -> list[int]:
    """Exact per-bin unit counts (private: release only through :func:`release_widths`)."""
    counts = [0] * (len(grid) + 1)
    for n in lengths:
        counts[bin_of(int(n), grid)] += 1
    return counts


@dataclass(frozen=True)
class WidthRelease:
    """Noisy per-bin counts over ``grid`` (DP output: everything derived from it is free)."""

    grid: tuple[int, ...]
    bins: tuple[float, ...]
    sigma: float

    def _tail(self, i: int) -> float:
        """Noisy number of units above edge ``i``."""
        return float(sum(self.bins[i + 1:]))

    def total(self) -> float:
        """Noisy number of units."""
        return float(sum(self.bins))

    def quantile(self, p: float = WIDTH_QUANTILE) -> int:
        """The smallest grid width at which at most a share ``1 - p`` of the (noisy) units lie above.

        The largest edge when none qualifies (also for an empty or all-noise release)."""
        total = self.total()
        for i, edge in enumerate(self.grid):
            if total > 0 and self._tail(i) <= (1.0 - p) * total:
                return int(edge)
        return int(self.grid[-1])

    def share_within(self, width: int) -> float | None:
        """DP estimate of the share of units whose longest row has at most ``width`` tokens
        (counted at the largest edge <= ``width``; None when the noisy total is not positive)."""
        total = self.total()
        if total <= 0:
            return None
        below = [i for i, edge in enumerate(self.grid) if edge <= width]
        inside = float(sum(self.bins[: below[-1] + 1])) if below else 0.0
        return min(1.0, max(0.0, inside / total))

    def to_dict(self) -> dict[str, Any]:
        """JSON form (what the store keeps)."""
        return {"grid": list(self.grid), "bins": list(self.bins), "sigma": self.sigma}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WidthRelease":
        return cls(tuple(int(x) for x in d["grid"]), tuple(float(x) for x in d["bins"]), float(d["sigma"]))


def release_widths(lengths: Iterable[int], noise: Noise, sigma: float = WIDTH_SIGMA,
                   grid: Sequence[int] = WIDTH_GRID) -> tuple[WidthRelease, dpa.DpEvent]:
    """The DP length histogram of one value per unit, and its event (:func:`width_event`)."""
    if sigma <= 0:
        raise ValueError("sigma must be positive")
    exact = np.asarray(length_histogram(lengths, grid), dtype=float)
    noisy = exact + noise.normal(sigma, exact.shape[0])
    return WidthRelease(tuple(int(g) for g in grid), tuple(float(x) for x in noisy), sigma), width_event(sigma)


def derived_width(public_tokens: int, example_tokens: int, shots_per_subset: int, quantile: int) -> int:
    """Prompt width for N examples of up to ``quantile`` text tokens each (all inputs public).

    ``public_tokens``: the longest public prompt (instruction + label header) of the task;
    ``example_tokens``: the template tokens one example adds besides its text (plus a margin for
    tokens merging across the boundary). Clamped to what a generation config accepts.
    """
    width = public_tokens + shots_per_subset * (quantile + example_tokens)
    return int(min(MAX_WIDTH, max(MIN_WIDTH, math.ceil(width))))
