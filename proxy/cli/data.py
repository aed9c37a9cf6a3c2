"""``dpicl data``: write a sample dataset from the offline packages as JSONL (for trying the proxy),
optionally split into a pool to upload and disjoint held-out test rows to evaluate on."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any, Optional, Sequence

import typer

from proxy.cli.common import fail


class SampleData(str, Enum):
    trec = "trec"
    r8 = "r8"


def _write(path: Path, examples: Sequence[Any]) -> None:
    """Rows as JSONL, written aside then renamed: never half a file."""
    tmp = path.with_name(path.name + ".part")
    with tmp.open("w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps({"text": ex.text, "label": ex.label}, ensure_ascii=False) + "\n")
    tmp.replace(path)


def data(
    name: SampleData = typer.Argument(..., help="trec (questions by answer type) or r8 (Reuters news topics)."),
    output: Path = typer.Option(..., "-o", "--output", help="JSONL file to write ({\"text\", \"label\"} per line)."),
    rows: Optional[int] = typer.Option(None, "--rows", min=1, help="Keep only the first N rows (default: all)."),
    test_output: Optional[Path] = typer.Option(
        None, "--test-output",
        help="Also hold out --test-rows random rows into this file; -o gets the rest minus repeats of their text."),
    test_rows: int = typer.Option(500, "--test-rows", min=1, help="Held-out rows with --test-output."),
    seed: int = typer.Option(0, "--seed", help="Seed of the held-out split (public: the sample data is public)."),
) -> None:
    """Write a labelled sample dataset that ships inside the installed packages (no download)."""
    from aggregation.datasets import load_r8, load_trec, split

    try:
        examples = load_trec() if name is SampleData.trec else load_r8()
    except FileNotFoundError as exc:
        fail(str(exc))
    if rows is not None:
        examples = examples[:rows]
    test: list[Any] = []
    if test_output is not None:
        if test_output.resolve() == output.resolve():
            fail("--test-output must be a different file from -o")
        if test_rows >= len(examples):
            fail(f"--test-rows {test_rows} leaves no rows for the pool ({len(examples)} rows)")
        examples, test = split(examples, test_rows, seed=seed)
        # TREC repeats some questions: a pool row whose text is also a test question would leak it.
        held_out = {" ".join(ex.text.split()) for ex in test}
        examples = [ex for ex in examples if " ".join(ex.text.split()) not in held_out]
        _write(test_output, test)
    _write(output, examples)
    labels = sorted({ex.label for ex in examples})
    typer.echo(f"wrote {len(examples)} rows ({len(labels)} labels: {', '.join(labels)}) to {output}", err=True)
    if test_output is not None:
        typer.echo(f"wrote {len(test)} held-out rows, none of them in {output}, to {test_output}", err=True)


def register(app: typer.Typer) -> None:
    """Add ``data`` to the ``dpicl`` app."""
    app.command("data")(data)
