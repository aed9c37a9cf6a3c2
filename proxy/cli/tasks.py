"""``dpicl tasks add|list|show|delete|warm|warmups|cancel|demos`` over the admin API.

``warm`` starts the charged warm-up and follows it with a progress bar (``GET /admin/warmups/{id}``);
a server that answers the warm-up synchronously (HTTP 200/201) is handled the same way, without
the bar. The demonstrations shown are DP output, never private rows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, List, Optional

import typer

from proxy.cli.common import require_finite
from proxy.cli.http import JSON_OPTION, KEY_OPTION, URL_OPTION, AdminClient, die
from proxy.cli.output import cell, fields, print_json, print_list, table

tasks_app = typer.Typer(help="Tasks: models whose requests get DP demonstrations; warm their cache.",
                        no_args_is_help=True)

_COLUMNS = [
    ("name", lambda t: t.get("name")),
    ("dataset", lambda t: t.get("dataset")),
    ("upstream", lambda t: t.get("upstream")),
    ("epsilon", lambda t: t.get("epsilon")),
    ("shots", lambda t: t.get("shots")),
    ("mode", lambda t: (t.get("generation") or {}).get("mode")),
    ("source", lambda t: t.get("source")),
]

FINISHED = ("done", "failed", "cancelled", "lost")


def _value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _pairs(items: List[str], option: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            die(f"{option} wants KEY=VALUE, got {item!r}", 2)
        out[key.strip()] = value
    return out


@tasks_app.command("add")
def add(
    name: str = typer.Argument(..., help="The model name clients will send."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Dataset name (newest version) or id."),
    instruction: Optional[str] = typer.Option(None, "--instruction", help="The task instruction (public)."),
    input_prefix: Optional[str] = typer.Option(None, "--input-prefix", help="e.g. 'Question:'"),
    label_prefix: Optional[str] = typer.Option(None, "--label-prefix", help="e.g. 'Answer type:'"),
    label_word: List[str] = typer.Option([], "--label-word", help="LABEL=word shown for a label (repeatable)."),
    label: List[str] = typer.Option([], "--label", help="Only these labels get demonstrations (repeatable; default all)."),
    upstream: Optional[str] = typer.Option(None, "--upstream", help="Where requests go (default local/smollm2)."),
    generator: Optional[str] = typer.Option(None, "--generator", help="Model that generates demonstrations."),
    shots: Optional[int] = typer.Option(None, "--shots", help="Demonstrations per label."),
    epsilon: Optional[float] = typer.Option(None, "--epsilon", help="Target epsilon of one demonstration set."),
    answer: Optional[str] = typer.Option(None, "--answer",
                                         help="text (the upstream's completion, default) or label (the label word "
                                              "the local model scores highest)."),
    clusters: Optional[int] = typer.Option(None, "--clusters",
                                           help="K private clusters per label (0 = off, at most 32): one demonstration "
                                                "per usable cluster, composed in parallel (generation.clusters)."),
    clustering: Optional[str] = typer.Option(None, "--clustering",
                                             help="Centroids of --clusters: dp (DP k-means, default) or public "
                                                  "(epsilon-0 demonstrations)."),
    generation: List[str] = typer.Option([], "--gen", "-g",
                                         help="Generation setting KEY=VALUE, e.g. -g max_tokens=20 -g mode=fixed."),
    file: Optional[Path] = typer.Option(None, "--file", exists=True, dir_okay=False,
                                        help="JSON or YAML task spec; the flags override its fields."),
    allow_missing_dataset: bool = typer.Option(False, "--allow-missing-dataset",
                                               help="Create the task before its dataset is uploaded (it waits)."),
    url: Optional[str] = URL_OPTION, admin_key: Optional[str] = KEY_OPTION, as_json: bool = JSON_OPTION,
) -> None:
    """Create (or replace) a task through the admin API.

    The dataset must be uploaded already (unless --allow-missing-dataset), the labels must be in its
    label domain and the epsilon within its whole budget."""
    require_finite("--epsilon", epsilon)
    spec: dict[str, Any] = {}
    if file is not None:
        import yaml

        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            die(f"{file}: not valid JSON or YAML", 2)
        if not isinstance(loaded, dict):
            die(f"{file}: the task spec must be a mapping", 2)
        spec.update(loaded)
    spec["name"] = name
    flags = {"dataset": dataset, "instruction": instruction, "input_prefix": input_prefix,
             "label_prefix": label_prefix, "upstream": upstream, "generator": generator, "shots": shots,
             "epsilon": epsilon, "answer": answer}
    spec.update({k: v for k, v in flags.items() if v is not None})
    if label:
        spec["labels"] = list(label)
    if label_word:
        spec["label_words"] = {**(spec.get("label_words") or {}), **_pairs(label_word, "--label-word")}
    gen = {k: _value(v) for k, v in _pairs(generation, "--gen").items()}
    if clustering is not None and clustering not in ("dp", "public"):
        die("--clustering takes dp or public", 2)
    gen.update({k: v for k, v in {"clusters": clusters, "clustering": clustering}.items() if v is not None})
    if gen:
        spec["generation"] = {**(spec.get("generation") or {}), **gen}
    with AdminClient(url, admin_key) as api:
        params = {"allow_missing_dataset": "true"} if allow_missing_dataset else None
        rec = api.post("/admin/tasks", json=spec, params=params)
    if as_json:
        print_json(rec)
    elif rec.get("status") == "waiting":
        typer.echo(f"task {rec.get('name')} created, waiting for dataset {rec.get('dataset')} to be uploaded; "
                   f"then warm it with: dpicl tasks warm {rec.get('name')}")
    else:
        typer.echo(f"task {rec.get('name')} created (dataset {rec.get('dataset')}, epsilon {cell(rec.get('epsilon'))} "
                   f"per demonstration set); warm it with: dpicl tasks warm {rec.get('name')}")


@tasks_app.command("list")
def list_tasks(url: Optional[str] = URL_OPTION, admin_key: Optional[str] = KEY_OPTION,
               as_json: bool = JSON_OPTION) -> None:
    """Every task (from the config file and created through the API)."""
    with AdminClient(url, admin_key) as api:
        data = api.get("/admin/tasks")
    print_list(data, _COLUMNS, as_json, empty="no tasks yet: dpicl tasks add NAME --dataset ... --instruction ...")
    if not as_json:
        # A task that cannot be warmed yet says why under the table: waiting (its dataset is not
        # uploaded yet, normal for a config task) is not broken; invalid names what to fix.
        for t in data.get("data") or []:
            if t.get("status") not in (None, "ready"):
                typer.echo(f"{t.get('name')}: {t.get('status')}: {t.get('status_detail')}")


@tasks_app.command("show")
def show(name: str, url: Optional[str] = URL_OPTION, admin_key: Optional[str] = KEY_OPTION,
         as_json: bool = JSON_OPTION) -> None:
    """One task's settings."""
    with AdminClient(url, admin_key) as api:
        rec = api.get(f"/admin/tasks/{name}")
    print_json(rec) if as_json else fields(rec)


@tasks_app.command("delete")
def delete(name: str, url: Optional[str] = URL_OPTION, admin_key: Optional[str] = KEY_OPTION,
           as_json: bool = JSON_OPTION) -> None:
    """Delete an API-created task and its cached demonstrations."""
    with AdminClient(url, admin_key) as api:
        rec = api.delete(f"/admin/tasks/{name}")
    print_json(rec) if as_json else typer.echo(f"deleted task {name}")


def _print_demos(rec: dict[str, Any]) -> None:
    demos = rec.get("demonstrations")
    if isinstance(demos, dict):  # GET /demos nests the cached payload
        demos = demos.get("demos")
    columns = [("label", lambda d: d.get("label")), ("demonstration (DP output)", lambda d: d.get("text"))]
    if any("cluster" in d for d in demos or []):  # clustered sets: cluster id and its DP size
        columns[1:1] = [("cluster", lambda d: d.get("cluster")), ("noisy size", lambda d: d.get("cluster_size"))]
    table(demos or [], columns, empty="no demonstrations cached")


def _print_clusters(clusters: dict[str, Any]) -> None:
    """The clusters a clustered set uses: label, cluster id, DP size, shots (released sizes only)."""
    rows = [{"label": label, **c} for label, used in clusters.items() for c in used]
    if rows:
        table(rows, [("label", lambda r: r.get("label")), ("cluster", lambda r: r.get("cluster")),
                     ("DP size", lambda r: r.get("noisy_size")), ("shots", lambda r: r.get("shots"))],
              title="clusters (DP sizes)")


def _follow(api: AdminClient, view: dict[str, Any], interval: float) -> dict[str, Any]:
    """Poll the warm-up until it finishes, drawing a progress bar of tokens generated."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} tokens"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        handle = bar.add_task(f"warm-up {view['id']}", total=view.get("tokens_total") or None)
        while True:
            bar.update(handle, total=view.get("tokens_total") or None, completed=view.get("tokens_done") or 0,
                       description=f"{view.get('task')} {view.get('state')}")
            if view.get("state") in FINISHED:
                return view
            time.sleep(interval)
            view = api.get(f"/admin/warmups/{view['id']}")


@tasks_app.command("warm")
def warm(
    name: str,
    dry_run: bool = typer.Option(False, "--dry-run", help="Only price the set: nothing is charged or read "
                                                          "(exit status 1 when it does not fit the budget)."),
    follow: bool = typer.Option(True, "--follow/--no-follow", help="Follow the warm-up until it ends."),
    interval: float = typer.Option(1.0, "--interval", min=0.1, help="Seconds between progress polls."),
    url: Optional[str] = URL_OPTION, admin_key: Optional[str] = KEY_OPTION, as_json: bool = JSON_OPTION,
) -> None:
    """Generate the task's DP demonstration set (charged to its dataset's budget before any row is read)."""
    with AdminClient(url, admin_key, timeout=3600.0) as api:
        resp = api.send("POST", f"/admin/tasks/{name}/demos", json={"dry_run": dry_run})
        rec = resp.json()
        if dry_run:
            if as_json:
                print_json(rec)
            else:
                fields(rec, ["task", "cached", "epsilon_cost", "set_epsilon", "spent_epsilon", "remaining_epsilon",
                             "remaining_after", "budget_epsilon", "fits", "estimate", "prompt_width"], title="dry run (nothing charged)")
                _print_clusters(rec.get("clusters") or {})
            if rec.get("fits") is False and not rec.get("cached"):  # scripts can test the exit status
                die(f"the set for {name} does not fit the budget: it costs epsilon {cell(rec.get('epsilon_cost'))}, "
                    f"{cell(rec.get('remaining_epsilon'))} remains")
            return
        if resp.status_code == 202 or rec.get("object") == "warmup":
            if follow and rec.get("state") not in FINISHED:
                rec = _follow(api, rec, interval) if not as_json else _poll(api, rec, interval)
            if as_json:
                print_json(rec)
            elif rec.get("state") == "done":
                typer.echo(f"warm-up {rec['id']} done: epsilon cost {cell(rec.get('epsilon_cost'))}")
                if rec.get("result"):
                    _print_demos(rec["result"])
            elif rec.get("state") in FINISHED:
                err = rec.get("error") or {}
                die(f"warm-up {rec['id']} {rec['state']}: {err.get('message') or 'no details'}")
            else:
                typer.echo(f"warm-up {rec['id']} {rec.get('state')}; follow it with: dpicl tasks warmups")
            if rec.get("state") in ("failed", "cancelled", "lost"):
                raise typer.Exit(1)
            return
    # A server that generates within the request answers with the finished set.
    if as_json:
        print_json(rec)
        return
    what = "generated and charged" if rec.get("charged") else "already cached (no charge)"
    typer.echo(f"{name}: demonstrations {what}; epsilon of the set {cell(rec.get('epsilon'))}, "
               f"cost now {cell(rec.get('epsilon_cost', 0.0))}")
    _print_demos(rec)


def _poll(api: AdminClient, view: dict[str, Any], interval: float) -> dict[str, Any]:
    while view.get("state") not in FINISHED:
        time.sleep(interval)
        view = api.get(f"/admin/warmups/{view['id']}")
    return view


warmups_app = typer.Typer(help="Recent warm-ups with their progress; cancel one.")


@warmups_app.callback(invoke_without_command=True)
def warmups(ctx: typer.Context, url: Optional[str] = URL_OPTION, admin_key: Optional[str] = KEY_OPTION,
            as_json: bool = JSON_OPTION) -> None:
    """Recent warm-ups with their progress (and, for one that stopped, what happened to its cost)."""
    if ctx.invoked_subcommand is not None:
        return
    with AdminClient(url, admin_key) as api:
        data = api.get("/admin/warmups")
    print_list(data, [
        ("id", lambda w: w.get("id")), ("task", lambda w: w.get("task")),
        ("state", lambda w: w.get("state") + (" (cancel requested)" if w.get("cancel_requested")
                                              and w.get("state") == "running" else "")),
        ("tokens", lambda w: f"{w.get('tokens_done') or 0}/{w.get('tokens_total') or '?'}"),
        ("epsilon cost", lambda w: w.get("epsilon_cost")), ("seconds", lambda w: w.get("seconds_elapsed")),
        ("cost", lambda w: w.get("note") or ""),
    ], as_json, empty="no warm-ups yet")


def cancel(warmup_id: str, url: Optional[str] = URL_OPTION, admin_key: Optional[str] = KEY_OPTION,
           as_json: bool = JSON_OPTION) -> None:
    """Cancel a warm-up (queued: at once, nothing charged; running: stops before its next token, charge stays).

    A running warm-up may have read rows, so its charge is never refunded.
    """
    with AdminClient(url, admin_key) as api:
        resp = api.send("POST", f"/admin/warmups/{warmup_id}/cancel")
    view = resp.json()
    if as_json:
        print_json(view)
    elif resp.status_code == 202:
        typer.echo(f"warm-up {warmup_id} is running: asked to stop before its next token; its charge stays "
                   f"(epsilon {cell(view.get('epsilon_cost'))}); follow it with: dpicl tasks warmups")
    else:
        typer.echo(f"warm-up {warmup_id} cancelled; {view.get('note') or 'nothing was charged'}")


tasks_app.command("cancel")(cancel)
warmups_app.command("cancel")(cancel)
tasks_app.add_typer(warmups_app, name="warmups")


@tasks_app.command("demos")
def demos(name: str, url: Optional[str] = URL_OPTION, admin_key: Optional[str] = KEY_OPTION,
          as_json: bool = JSON_OPTION) -> None:
    """The task's cached demonstration set (DP output) and what it cost."""
    with AdminClient(url, admin_key) as api:
        rec = api.get(f"/admin/tasks/{name}/demos")
    if as_json:
        print_json(rec)
        return
    payload = rec.get("demonstrations") if isinstance(rec.get("demonstrations"), dict) else {}
    if not rec.get("cached"):
        typer.echo(f"{name}: no demonstrations cached; run: dpicl tasks warm {name}")
        return
    typer.echo(f"{name}: dataset {payload.get('dataset_id')} v{payload.get('dataset_version')}, "
               f"epsilon {cell(payload.get('epsilon'))}, {payload.get('tokens')} tokens in {cell(payload.get('seconds'))} s")
    _print_demos(rec)


def register(app: typer.Typer) -> None:
    """Add ``tasks`` to the ``dpicl`` app."""
    app.add_typer(tasks_app, name="tasks")
