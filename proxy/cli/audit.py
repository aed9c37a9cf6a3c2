"""``dpicl audit``: the admin audit log (who did what to which dataset, task or key), newest first.

The filters apply on this side: the command pages through ``GET /admin/audit`` (newest first,
``before`` = the smallest ``seq`` seen) until it has ``--limit`` matching records or the log ends.
The audit log holds actions and names, never row text.
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional

import typer

from proxy.cli.http import JSON_OPTION, KEY_OPTION, URL_OPTION, AdminClient, die
from proxy.cli.output import cell, print_json, table, when

#: Records asked for per page (the server's maximum).
PAGE = 1000


def _details(rec: dict[str, Any]) -> str:
    parts = []
    for key, value in (rec.get("details") or {}).items():
        parts.append(f"{key}={json.dumps(value) if isinstance(value, (dict, list)) else cell(value)}")
    return ", ".join(parts) or "-"


_COLUMNS = [
    ("#", lambda e: e.get("seq")),
    ("time", lambda e: when(e.get("time"))),
    ("actor", lambda e: e.get("actor")),
    ("action", lambda e: e.get("action")),
    ("target", lambda e: e.get("target"), True),
    ("details", _details),
]


def _since(value: Optional[str]) -> Optional[float]:
    """``--since``: a duration back from now (``90s``, ``30m``, ``12h``, ``7d``), or None."""
    if value is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    raw = value.strip().lower()
    try:
        amount = float(raw[:-1]) if raw[-1:] in units else float(raw)
        seconds = amount * units.get(raw[-1:], 1)
    except ValueError:
        die(f"--since wants a duration like 30m, 12h or 7d, got {value!r}", 2)
    if not seconds >= 0 or seconds == float("inf"):
        die(f"--since wants a finite duration, got {value!r}", 2)
    return time.time() - seconds


def matches(rec: dict[str, Any], action: Optional[str], target: Optional[str], actor: Optional[str]) -> bool:
    """Whether one record passes the filters: ``action`` is a prefix (``budget`` matches
    ``budget.set`` and ``budget.reset``), ``target`` and ``actor`` are exact."""
    name = str(rec.get("action") or "")
    if action is not None and not (name == action or name.startswith(action.rstrip(".") + ".")):
        return False
    if target is not None and rec.get("target") != target:
        return False
    return actor is None or rec.get("actor") == actor


def audit(
    action: Optional[str] = typer.Option(None, "--action", help="Only this action or family (budget, budget.set, ...)."),
    target: Optional[str] = typer.Option(None, "--target", help="Only this target (a dataset name, task or key)."),
    actor: Optional[str] = typer.Option(None, "--actor", help="Only records by this actor (admin, a client name)."),
    since: Optional[str] = typer.Option(None, "--since", help="Only the last 30m / 12h / 7d."),
    limit: int = typer.Option(50, "--limit", "-n", min=1, max=100_000, help="At most this many records."),
    url: Optional[str] = URL_OPTION, admin_key: Optional[str] = KEY_OPTION, as_json: bool = JSON_OPTION,
) -> None:
    """The admin audit log, newest first (uploads, budget changes and resets, tasks, keys, warm-ups)."""
    after = _since(since)
    found: list[dict[str, Any]] = []
    before: Optional[int] = None
    with AdminClient(url, admin_key) as api:
        while len(found) < limit:
            params: dict[str, Any] = {"limit": PAGE}
            if before is not None:
                params["before"] = before
            page = api.get("/admin/audit", params=params).get("data", [])
            old = False
            for rec in page:
                if after is not None and (rec.get("time") or 0) < after:
                    old = True  # newest first: everything after this is older still
                    break
                if matches(rec, action, target, actor):
                    found.append(rec)
            if old or len(page) < PAGE:
                break
            before = min(int(r["seq"]) for r in page)
    found = found[:limit]
    if as_json:
        print_json({"object": "list", "data": found})
    else:
        table(found, _COLUMNS, empty="no audit records match" if (action or target or actor or since)
              else "no admin actions yet")


def register(app: typer.Typer) -> None:
    """Add ``audit`` to the ``dpicl`` app."""
    app.command("audit")(audit)
