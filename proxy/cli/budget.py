"""``dpicl budget show|set|reset``: privacy budgets per dataset name, from the admin API.

Budgets belong to a dataset name (all its versions). Servers older than the per-name budget routes
are handled too: the commands fall back to ``/admin/datasets/{id}/budget``.
"""

from __future__ import annotations

from typing import Any, Optional

import typer

from proxy.cli.common import require_finite
from proxy.cli.http import JSON_OPTION, KEY_OPTION, URL_OPTION, AdminClient, die
from proxy.cli.output import cell, fields, print_json, table, when

budget_app = typer.Typer(help="Privacy budgets: show, set, reset.", no_args_is_help=True)


def normalize(rec: dict[str, Any]) -> dict[str, Any]:
    """One budget view in the per-name shape, whichever shape the server answered with."""
    out = dict(rec)
    out.setdefault("name", rec.get("dataset_id"))
    out.setdefault("epsilon_budget", rec.get("budget_epsilon"))
    out.setdefault("delta_budget", rec.get("budget_delta"))
    out.setdefault("epsilon_spent", rec.get("spent_epsilon"))
    if out.get("epsilon_budget") is not None and out.get("epsilon_spent") is not None:
        out.setdefault("epsilon_remaining", max(0.0, out["epsilon_budget"] - out["epsilon_spent"]))
    return out


_COLUMNS = [
    ("name", lambda r: r.get("name")),
    ("epsilon budget", lambda r: r.get("epsilon_budget")),
    ("spent", lambda r: r.get("epsilon_spent")),
    ("remaining", lambda r: r.get("epsilon_remaining", r.get("remaining_epsilon"))),
    ("delta", lambda r: r.get("delta_budget")),
    ("versions", lambda r: r.get("versions")),
    ("events", lambda r: r.get("events")),
]

def _partition(e: dict[str, Any]) -> Any:
    part = e.get("partition")
    return "whole dataset" if part == "*" else part


_LEDGER = [
    ("seq", lambda e: e.get("seq")),
    ("time", lambda e: when(e.get("time", e.get("created_at")))),
    ("kind", lambda e: e.get("kind")),
    ("label / partition", _partition),
    ("version", lambda e: e.get("dataset_id"), True),
    ("reason", lambda e: e.get("reason") or e.get("ref")),
    ("by", lambda e: e.get("actor")),
    ("epsilon after", lambda e: e.get("epsilon_after")),
]


def _legacy_path(api: AdminClient, name: str) -> str:
    """``/admin/datasets/{id}/budget`` of the newest version named ``name`` (servers without per-name routes)."""
    versions = [d for d in api.get("/admin/datasets").get("data", []) if name in (d.get("name"), d.get("id"))]
    if not versions:
        die(f"no dataset named {name!r}")
    newest = max(versions, key=lambda d: d.get("version") or 0)
    return f"/admin/datasets/{newest['id']}/budget"


@budget_app.command("show")
def show(name: Optional[str] = typer.Argument(None, help="Dataset name or a version's id (default: every dataset)."),
         url: Optional[str] = URL_OPTION, admin_key: Optional[str] = KEY_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Budget, spent and remaining epsilon; with a name also its ledger."""
    with AdminClient(url, admin_key) as api:
        if name is None:
            data = api.get("/admin/budget")
            if as_json:
                print_json(data)
            else:
                table([normalize(r) for r in data.get("data", [])], _COLUMNS, empty="no datasets yet")
            return
        resp = api.send("GET", f"/admin/budget/{name}", ok_missing=True)
        if resp.status_code in (404, 405):  # an older server: budgets per dataset id
            resp = api.send("GET", _legacy_path(api, name))
        rec = resp.json()
    if as_json:
        print_json(rec)
        return
    view = normalize(rec)
    fields(view, ["name", "epsilon_budget", "epsilon_spent", "epsilon_remaining", "delta_budget", "delta_spent",
                  "versions", "events"])
    parts = view.get("partitions") or view.get("per_partition") or {}
    if parts:  # "label#j" is cluster j of a label (generation.clusters)
        table([{"partition": p, "spent": v} for p, v in parts.items()],
              [("label / partition", _partition), ("spent epsilon", lambda r: r.get("spent"))], title="partitions")
    table(view.get("ledger", view.get("entries", [])), _LEDGER, title="ledger", empty="no spending yet")


@budget_app.command("set")
def set_budget(name: str = typer.Argument(..., help="Dataset name (or a version's id)."),
               epsilon: float = typer.Option(..., "--epsilon", help="New epsilon budget (not below what is spent)."),
               delta: Optional[float] = typer.Option(None, "--delta", help="New delta budget."),
               url: Optional[str] = URL_OPTION, admin_key: Optional[str] = KEY_OPTION,
               as_json: bool = JSON_OPTION) -> None:
    """Set a dataset's privacy budget."""
    require_finite("--epsilon", epsilon)
    require_finite("--delta", delta)
    body: dict[str, Any] = {"epsilon": epsilon}
    if delta is not None:
        body["delta"] = delta
    with AdminClient(url, admin_key) as api:
        resp = api.send("PUT", f"/admin/budget/{name}", ok_missing=True, json=body)
        if resp.status_code in (404, 405):
            resp = api.send("PUT", _legacy_path(api, name), json=body)
        rec = resp.json()
    if as_json:
        print_json(rec)
    else:
        view = normalize(rec)
        typer.echo(f"{view.get('name')}: budget epsilon {cell(view.get('epsilon_budget'))}, "
                   f"spent {cell(view.get('epsilon_spent'))}")


@budget_app.command("reset")
def reset(name: str = typer.Argument(..., help="Dataset name (or a version's id)."),
          reason: str = typer.Option(..., "--reason", help="Why (kept in the audit log)."),
          yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
          url: Optional[str] = URL_OPTION, admin_key: Optional[str] = KEY_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Start a new budget period for a dataset (the old ledger stays in the audit trail)."""
    if not reason.strip():
        die("--reason must not be empty", 2)
    with AdminClient(url, admin_key) as api:
        # Ask only about a name that exists, and say what is being forgotten.
        now = normalize(api.get(f"/admin/budget/{name}"))
        question = (f"reset the budget of {now.get('name')} (spent {cell(now.get('epsilon_spent'))} of "
                    f"{cell(now.get('epsilon_budget'))})? the spending stays in the ledger and the audit log")
        if not yes and not typer.confirm(question):
            die("not reset", 1)
        rec = api.post(f"/admin/budget/{now.get('name') or name}/reset", json={"reason": reason})
    if as_json:
        print_json(rec)
    else:
        view = normalize(rec)
        typer.echo(f"{view.get('name')}: reset; spent {cell(view.get('epsilon_spent'))} "
                   f"of {cell(view.get('epsilon_budget'))}")


def register(app: typer.Typer) -> None:
    """Add ``budget`` to the ``dpicl`` app."""
    app.add_typer(budget_app, name="budget")
