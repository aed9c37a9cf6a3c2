"""``dpicl keys list|create|delete``: client keys over the admin API (secrets are shown once)."""

from __future__ import annotations

from typing import List, Optional

import typer

from proxy.cli.http import JSON_OPTION, KEY_OPTION, URL_OPTION, AdminClient
from proxy.cli.output import print_json, print_list, when

keys_app = typer.Typer(help="Client keys: which apps may call which tasks.", no_args_is_help=True)


@keys_app.command("list")
def list_keys(url: Optional[str] = URL_OPTION, admin_key: Optional[str] = KEY_OPTION,
              as_json: bool = JSON_OPTION) -> None:
    """Client keys from the config file (read-only) and created here (never their secrets)."""
    with AdminClient(url, admin_key) as api:
        data = api.get("/admin/keys")
    print_list(data, [
        ("name", lambda k: k.get("name")), ("tasks", lambda k: k.get("tasks")),
        ("passthrough", lambda k: k.get("passthrough")), ("source", lambda k: k.get("source")),
        ("key starts", lambda k: (k.get("key_prefix") + "...") if k.get("key_prefix") else None),
        ("created", lambda k: when(k.get("created_at"))),
    ], as_json, empty="no client keys")


@keys_app.command("create")
def create(
    name: str = typer.Argument(..., help="Key name (shown in logs and the audit log)."),
    task: List[str] = typer.Option([], "--task", "-t", help="A task this key may use (repeatable; '*' = all)."),
    passthrough: bool = typer.Option(True, "--passthrough/--no-passthrough",
                                     help="May also call non-task models directly."),
    url: Optional[str] = URL_OPTION, admin_key: Optional[str] = KEY_OPTION, as_json: bool = JSON_OPTION,
) -> None:
    """Create a client key; its secret is printed once (only its SHA-256 is stored)."""
    with AdminClient(url, admin_key) as api:
        rec = api.post("/admin/keys", json={"name": name, "tasks": task, "passthrough": passthrough})
    if as_json:
        print_json(rec)
        return
    typer.echo(f"client key {rec['name']} created (tasks: {', '.join(rec['tasks']) or 'none'}; "
               f"passthrough: {'yes' if rec['passthrough'] else 'no'}). Its secret, shown only now:", err=True)
    typer.echo(rec["key"])


@keys_app.command("delete")
def delete(name: str, url: Optional[str] = URL_OPTION, admin_key: Optional[str] = KEY_OPTION,
           as_json: bool = JSON_OPTION) -> None:
    """Delete a client key (other replicas stop accepting it within server.cache_recheck_seconds)."""
    with AdminClient(url, admin_key) as api:
        rec = api.delete(f"/admin/keys/{name}")
    print_json(rec) if as_json else typer.echo(f"deleted client key {name}")


def register(app: typer.Typer) -> None:
    """Add ``keys`` to the ``dpicl`` app."""
    app.add_typer(keys_app, name="keys")
