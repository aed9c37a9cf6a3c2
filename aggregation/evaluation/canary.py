"""Canary records for a privacy audit: plant unique random strings, then search outputs for them.

A canary is a random string nobody could guess (letters and digits, 12 characters by default, so
any 8-character piece of it has a chance of about 36**-8 of turning up by accident). Planted in
the private pool, it must not appear in demonstrations generated at finite epsilon; without noise
(epsilon = infinity) it can, and the audit reports that count as the contrast.

The search is deliberately generous (it counts more hits, never fewer): case is ignored and every
character that is not a letter or digit is dropped from both sides before matching, so a canary
split by spaces or punctuation in the output still counts.
"""

from __future__ import annotations

import difflib
import re
import string
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from aggregation.prompts import Example

CANARY_ALPHABET = string.ascii_lowercase + string.digits
#: How the canary appears inside a planted record (``{canary}`` is replaced).
DEFAULT_TEMPLATE = "What does {canary} stand for ?"
_NOT_ALNUM = re.compile(r"[^0-9a-z]+")


@dataclass(frozen=True)
class CanaryHit:
    """One canary found in one text: the longest piece of it that occurs, and whether all of it."""

    canary_index: int
    matched: int
    full: bool


def make_canaries(count: int, rng: np.random.Generator, length: int = 12) -> list[str]:
    """``count`` distinct random strings of ``length`` lowercase letters and digits."""
    if count < 1 or length < 1:
        raise ValueError("count and length must be at least 1")
    out: list[str] = []
    while len(out) < count:
        s = "".join(CANARY_ALPHABET[i] for i in rng.integers(0, len(CANARY_ALPHABET), length))
        if s not in out:
            out.append(s)
    return out


def plant_canaries(
    pool: Sequence[Example],
    label: str,
    canaries: Sequence[str],
    copies: int,
    rng: np.random.Generator,
    template: str = DEFAULT_TEMPLATE,
    unit: str | None = None,
) -> list[Example]:
    """A copy of ``pool`` with ``copies`` records of each canary under ``label``, shuffled in.

    Repeated copies are what a memorised secret looks like in real data (the same record in many
    documents); they are also what gives the non-private aggregate a chance to copy the canary.
    With ``unit``, every canary record carries that privacy unit (one person holding them all).
    """
    if copies < 1:
        raise ValueError("copies must be at least 1")
    if "{canary}" not in template:
        raise ValueError("template must contain {canary}")
    planted = [Example(template.format(canary=c), label, unit) for c in canaries for _ in range(copies)]
    merged = list(pool) + planted
    order = rng.permutation(len(merged))
    return [merged[i] for i in order]


def normalise(text: str) -> str:
    """Lower case, letters and digits only (the form both sides are matched in)."""
    return _NOT_ALNUM.sub("", text.lower())


def longest_match(text: str, canary: str) -> int:
    """Length of the longest piece of ``canary`` that occurs in ``text`` (after normalising)."""
    a, b = normalise(text), normalise(canary)
    if not a or not b:
        return 0
    # autojunk off: with it, characters frequent in long texts would be ignored and matches missed.
    m = difflib.SequenceMatcher(None, a, b, autojunk=False).find_longest_match(0, len(a), 0, len(b))
    return int(m.size)


def find_canaries(text: str, canaries: Sequence[str], min_length: int = 8) -> list[CanaryHit]:
    """Canaries of which at least ``min_length`` consecutive characters occur in ``text``."""
    if min_length < 1:
        raise ValueError("min_length must be at least 1")
    hits: list[CanaryHit] = []
    for i, canary in enumerate(canaries):
        n, size = longest_match(text, canary), len(normalise(canary))
        if n >= min(min_length, size):
            hits.append(CanaryHit(i, n, n == size))
    return hits
