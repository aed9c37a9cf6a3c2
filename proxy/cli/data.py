"""``dpicl data``: write a sample dataset from the offline packages as JSONL (for trying the proxy)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from proxy.cli.common import fail


class SampleData(str, Enum):
    trec = "trec"
    r8 = "r8"


def data(
    name: SampleData = typer.Argument(..., help="trec (questions by answer type) or r8 (Reuters news topics)."),
    output: Path = typer.Option(..., "-o", "--output", help="JSONL file to write ({\"text\", \"label\"} per line)."),
    rows: Optional[int] = typer.Option(None, "--rows", min=1, help="Keep only the first N rows (default: all)."),
) -> None:
    """Write a labelled sample dataset that ships inside the installed packages (no download)."""
    from aggregation.datasets import load_r8, load_trec

    try:
        examples = load_trec() if name is SampleData.trec else load_r8()
    except FileNotFoundError as exc:
        fail(str(exc))
    if rows is not None:
        examples = examples[:rows]
    tmp = output.with_name(output.name + ".part")
    with tmp.open("w", encoding="utf-8") as fh:  # written aside, then renamed: never half a file
        for ex in examples:
            fh.write(json.dumps({"text": ex.text, "label": ex.label}, ensure_ascii=False) + "\n")
    tmp.replace(output)
    labels = sorted({ex.label for ex in examples})
    typer.echo(f"wrote {len(examples)} rows ({len(labels)} labels: {', '.join(labels)}) to {output}", err=True)


def register(app: typer.Typer) -> None:
    """Add ``data`` to the ``dpicl`` app."""
    app.command("data")(data)
