"""``dpicl datasets upload|list|show|delete`` over the admin API (never shows a private row)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from proxy.cli.common import require_finite
from proxy.cli.http import JSON_OPTION, KEY_OPTION, URL_OPTION, AdminClient, die
from proxy.cli.output import fields, print_json, print_list, when

datasets_app = typer.Typer(help="Private datasets: upload, list, show, delete.", no_args_is_help=True)

_COLUMNS = [
    ("id", lambda r: r.get("id"), True),  # never cut: it is copied into the next command
    ("name", lambda r: r.get("name"), True),
    ("version", lambda r: r.get("version")),
    ("rows", lambda r: r.get("rows")),
    ("units", lambda r: r.get("units")),
    ("labels", lambda r: r.get("labels")),
    ("public", lambda r: r.get("public")),
    ("created", lambda r: when(r.get("created_at"))),
]


@datasets_app.command("upload")
def upload(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSONL ({\"text\", \"label\"} per line) or CSV."),
    name: str = typer.Option(..., "--name", help="Dataset name; an existing name gets a new version."),
    labels: Optional[str] = typer.Option(None, "--labels",
                                         help="The label domain, comma-separated (required unless --public)."),
    epsilon: Optional[float] = typer.Option(None, "--epsilon", help="Privacy budget (default: the server's)."),
    delta: Optional[float] = typer.Option(None, "--delta", help="Delta of the budget (default: the server's)."),
    public: bool = typer.Option(False, "--public", help="The data is public (no privacy needed)."),
    deduplicate: bool = typer.Option(True, "--deduplicate/--keep-duplicates", help="Drop exact repeated rows."),
    url: Optional[str] = URL_OPTION, admin_key: Optional[str] = KEY_OPTION, as_json: bool = JSON_OPTION,
) -> None:
    """Upload a dataset (its rows stay on the server; only counts come back)."""
    require_finite("--epsilon", epsilon)
    require_finite("--delta", delta)
    form = {"name": name, "public": str(public).lower(), "deduplicate": str(deduplicate).lower()}
    if labels is not None:
        form["labels"] = labels
    if epsilon is not None:
        form["epsilon"] = repr(epsilon)
    if delta is not None:
        form["delta"] = repr(delta)
    with AdminClient(url, admin_key) as api, file.open("rb") as fh:
        rec = api.post("/admin/datasets", data=form, files={"file": (file.name, fh)})
    if as_json:
        print_json(rec)
        return
    fields(rec, ["id", "name", "version", "rows", "units", "labels", "public", "duplicates_removed",
                 "budget_epsilon", "budget_delta"], title="uploaded")


@datasets_app.command("list")
def list_datasets(url: Optional[str] = URL_OPTION, admin_key: Optional[str] = KEY_OPTION,
                  as_json: bool = JSON_OPTION) -> None:
    """Every dataset version (metadata only)."""
    with AdminClient(url, admin_key) as api:
        data = api.get("/admin/datasets")
    print_list(data, _COLUMNS, as_json, empty="no datasets yet: dpicl datasets upload FILE --name NAME")


_REF_HELP = "Dataset id, or a name (its newest version)."


def resolve(api: AdminClient, ref: str) -> dict[str, Any]:
    """The dataset version ``ref`` names: the version with that id, else the newest version of that name.

    Resolved from the listing (metadata only), so servers that take only ids work too.
    """
    rows = api.get("/admin/datasets").get("data", [])
    by_id = [d for d in rows if d.get("id") == ref]
    if by_id:
        return by_id[0]
    versions = [d for d in rows if d.get("name") == ref]
    if not versions:
        die(f"no dataset with the id or name {ref!r}; see: dpicl datasets list")
    return max(versions, key=lambda d: d.get("version") or 0)


@datasets_app.command("show")
def show(dataset: str = typer.Argument(..., help=_REF_HELP), url: Optional[str] = URL_OPTION,
         admin_key: Optional[str] = KEY_OPTION, as_json: bool = JSON_OPTION) -> None:
    """One dataset version's metadata."""
    with AdminClient(url, admin_key) as api:
        rec = api.get(f"/admin/datasets/{resolve(api, dataset)['id']}")
    if as_json:
        print_json(rec)
    else:
        fields({**rec, "created_at": when(rec.get("created_at"))})


@datasets_app.command("delete")
def delete(dataset: str = typer.Argument(..., help=_REF_HELP),
           yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
           url: Optional[str] = URL_OPTION, admin_key: Optional[str] = KEY_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Delete a dataset version's rows and cached demonstrations (its ledger is kept)."""
    with AdminClient(url, admin_key) as api:
        target = resolve(api, dataset)  # a missing target is an error before any question
        what = f"{target.get('name')} v{target.get('version')} ({target['id']}, {target.get('rows')} rows)"
        if not yes and not typer.confirm(f"delete dataset {what}? its budget ledger stays"):
            die("not deleted", 1)
        rec = api.delete(f"/admin/datasets/{target['id']}")
    if as_json:
        print_json(rec)
    else:
        typer.echo(f"deleted {what} (its ledger stays)")


def register(app: typer.Typer) -> None:
    """Add ``datasets`` to the ``dpicl`` app."""
    app.add_typer(datasets_app, name="datasets")
