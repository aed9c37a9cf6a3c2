"""How the admin commands print: rich tables for people, ``--json`` for scripts."""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterable, Sequence

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

#: A column: (header, function of the row giving the cell); a third element ``True`` marks a
#: column whose cells are never cut or wrapped (ids a person copies into the next command).
Column = tuple[Any, ...]


def print_json(data: Any) -> None:
    """``data`` as indented JSON on stdout."""
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def cell(value: Any) -> str:
    """A table cell: ``-`` for missing, 3 decimals for floats, comma-joined lists."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={cell(v)}" for k, v in value.items()) or "-"
    return str(value)


def when(ts: Any) -> str:
    """A unix time as local ``YYYY-MM-DD HH:MM:SS``."""
    if not isinstance(ts, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def table(rows: Iterable[dict[str, Any]], columns: Sequence[Column], title: str | None = None,
          empty: str = "(none)") -> None:
    """Print ``rows`` as a table with ``columns``."""
    rows = list(rows)
    console = Console()
    if not rows:
        console.print(empty)
        return
    cells = [[cell(col[1](row)) for col in columns] for row in rows]
    t = Table(title=title, header_style="bold")
    for i, col in enumerate(columns):
        if len(col) > 2 and col[2]:  # whole: as wide as its longest cell, other columns give way
            t.add_column(col[0], no_wrap=True, min_width=max(len(r[i]) for r in cells))
        else:
            t.add_column(col[0])
    for row_cells in cells:
        t.add_row(*(Text(c) for c in row_cells))  # Text: no markup from data
    console.print(t)


def fields(record: dict[str, Any], keys: Sequence[str] | None = None, title: str | None = None) -> None:
    """Print one record as a two-column table (``keys`` in order, default all)."""
    t = Table(title=title, show_header=False)
    t.add_column(style="bold")
    t.add_column()
    for key in keys or list(record):
        if key in record:
            t.add_row(key, Text(cell(record[key])))
    Console().print(t)


def print_list(data: dict[str, Any], columns: Sequence[Column], as_json: bool, empty: str) -> None:
    """An admin API list answer: the raw JSON with ``--json``, else its ``data`` rows as a table."""
    if as_json:
        print_json(data)
    else:
        table(data.get("data", []), columns, empty=empty)
