"""``dpicl jobs ...`` (client of the admin API over HTTP) and ``dpicl worker`` (RQ queue worker).

The jobs commands need the server URL (``--url`` / ``DPICL_URL``, default http://127.0.0.1:8000)
and the admin key (``--admin-key`` / ``DPICL_ADMIN_KEY``). ``dpicl jobs evaluate`` downloads the
synthetic dataset and runs the quality check locally against real rows the admin already holds
(``--real``, optionally ``--test``): no endpoint ever returns private rows, and the server never
computes non-private statistics of a stored dataset. See docs/jobs.md.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, List, Optional

import typer

from proxy.cli.common import fail, require_finite
from proxy.cli.http import KEY_OPTION, URL_OPTION, AdminClient
from proxy.config import DEFAULT_JOB_QUEUE

jobs_app = typer.Typer(help="Offline DP synthetic-data jobs (Private Evolution, DP-SGD).", no_args_is_help=True)

_URL = URL_OPTION
_KEY = KEY_OPTION


def _coerce(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _fmt_eps(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}"


@jobs_app.command("submit")
def submit(
    kind: str = typer.Option(..., "--kind", help="pe or dpsgd"),
    dataset: str = typer.Option(..., "--dataset", help="Dataset id (or name: latest version)."),
    epsilon: float = typer.Option(4.0, "--epsilon", help="Target epsilon of the whole job."),
    param: List[str] = typer.Option([], "--param", "-p", help="Extra parameter key=value (value parsed as JSON if it can be)."),
    prompt: Optional[Path] = typer.Option(None, "--prompt", help="JSON file with instruction/input_prefix/label_prefix/label_words."),
    wait: bool = typer.Option(False, "--wait", help="Poll until the job ends."),
    quiet: bool = typer.Option(False, "--quiet", "-q",
                               help="Print only the job id (for scripts: JOB=$(dpicl jobs submit ... -q))."),
    url: Optional[str] = _URL, admin_key: Optional[str] = _KEY,
) -> None:
    """Submit a job; its full privacy cost is reserved before it is queued."""
    require_finite("--epsilon", epsilon)
    body: dict[str, Any] = {"kind": kind, "dataset": dataset, "epsilon": epsilon}
    for item in param:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--param wants key=value, got {key!r}")
        body[key.strip()] = _coerce(value)
    if prompt is not None:
        try:
            body["prompt"] = json.loads(prompt.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            fail(f"--prompt {prompt}: not a readable JSON file")
    with AdminClient(url, admin_key) as http:
        rec = http.post("/admin/jobs", json=body)
        line = (f"{rec['id']}  {rec['kind']}  {rec['state']}  epsilon charged {_fmt_eps(rec['epsilon_charged'])} "
                f"(job {_fmt_eps(rec['epsilon_job'])})")
        typer.echo(rec["id"] if quiet else line)
        if quiet:
            typer.echo(line, err=True)  # the charge is still shown to the person running the script
        if wait:
            rec = _wait(http, rec["id"])
            if not quiet:
                typer.echo(json.dumps(rec, indent=2))
            if rec["state"] != "succeeded":
                typer.echo(f"error: job {rec['id']} {rec['state']}: {rec.get('error') or 'no error recorded'}", err=True)
                raise typer.Exit(1)


def _wait(http: AdminClient, job_id: str, interval: float = 2.0) -> dict:
    last = None
    while True:
        rec = http.get(f"/admin/jobs/{job_id}")
        line = f"{rec['state']} {rec['progress']:.0f}% {rec.get('step') or ''}"
        if line != last:
            typer.echo(line, err=True)
            last = line
        if rec["state"] in ("succeeded", "failed", "cancelled"):
            return rec
        time.sleep(interval)


@jobs_app.command("list")
def list_jobs(url: Optional[str] = _URL, admin_key: Optional[str] = _KEY) -> None:
    """One line per job."""
    with AdminClient(url, admin_key) as http:
        data = http.get("/admin/jobs")["data"]
        # Dataset names from the listing (metadata only); a deleted version keeps its id.
        names = {d["id"]: f"{d['name']} v{d['version']}" for d in http.get("/admin/datasets").get("data", [])}
    for r in data:
        dataset = names.get(r["dataset_id"], f"{r['dataset_id']} (deleted)")
        typer.echo(f"{r['id']}  {r['kind']:5}  {r['state']:9}  {r['progress']:5.1f}%  eps {_fmt_eps(r['epsilon_charged'])}"
                   f"  {dataset}  {r.get('step') or ''}")


@jobs_app.command("show")
def show(job_id: str, url: Optional[str] = _URL, admin_key: Optional[str] = _KEY) -> None:
    """The job record as JSON."""
    with AdminClient(url, admin_key) as http:
        typer.echo(json.dumps(http.get(f"/admin/jobs/{job_id}"), indent=2))


@jobs_app.command("cancel")
def cancel(job_id: str, url: Optional[str] = _URL, admin_key: Optional[str] = _KEY) -> None:
    """Cancel a job (its reserved privacy cost stays spent)."""
    with AdminClient(url, admin_key) as http:
        rec = http.post(f"/admin/jobs/{job_id}/cancel")
    typer.echo(f"{rec['id']}  {rec['state']}  cancel requested")


@jobs_app.command("result")
def result(
    job_id: str,
    part: str = typer.Option("synthetic", "--part", help="synthetic (JSONL) or adapter (tar.gz, DP-SGD)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="File to write (default: stdout for JSONL)."),
    url: Optional[str] = _URL, admin_key: Optional[str] = _KEY,
) -> None:
    """Download a finished job's synthetic dataset or LoRA adapter."""
    with AdminClient(url, admin_key) as http:
        data = http.send("GET", f"/admin/jobs/{job_id}/result", params={"part": part}).content
    if output is None:
        if part != "synthetic":
            fail("give -o FILE for binary parts")
        sys.stdout.write(data.decode())
    else:
        output.write_bytes(data)
        typer.echo(f"wrote {len(data)} bytes to {output}", err=True)


@jobs_app.command("evaluate")
def evaluate(
    job_id: str,
    real: Path = typer.Option(..., "--real", help="Real rows (JSONL/CSV text,label): the private pool."),
    test: Optional[Path] = typer.Option(None, "--test", help="Held-out real rows; default: split --real."),
    test_fraction: float = typer.Option(0.2, help="Held-out fraction when --test is not given."),
    seed: int = typer.Option(0, help="Split / classifier seed."),
    url: Optional[str] = _URL, admin_key: Optional[str] = _KEY,
) -> None:
    """TF-IDF + logistic regression trained on the job's synthetic data vs on the real pool, both
    scored on held-out real data (runs locally; prints JSON)."""
    from aggregation.datasets import parse_rows, read_jsonl
    from aggregation.evaluation.quality import evaluate as run_eval

    with AdminClient(url, admin_key) as http:
        data = http.send("GET", f"/admin/jobs/{job_id}/result", params={"part": "synthetic"}).content
    synthetic = parse_rows(data, "synthetic.jsonl")
    report = run_eval(synthetic, read_jsonl(real), read_jsonl(test) if test else None,
                      test_fraction=test_fraction, seed=seed)
    typer.echo(json.dumps({"job": job_id, **report.to_dict()}, indent=2))


def worker(
    redis: str = typer.Option(..., "--redis", help="Redis URL of the job queue (redis://host:port/db)."),
    store: Optional[str] = typer.Option(None, "--store", help="Store URL (default: $DPICL_STORE_URL or the config's)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (model_list, local model)."),
    queue: str = typer.Option(DEFAULT_JOB_QUEUE, "--queue", help="Queue name (the servers' jobs.queue_name)."),
    burst: bool = typer.Option(False, "--burst", help="Exit when the queue is empty."),
    heartbeat: float = typer.Option(5.0, "--heartbeat", min=0.05, help="Seconds between job heartbeats."),
    pe_backend: Optional[str] = typer.Option(None, "--pe-backend", help="module:factory for PE's text generation (default: local model / litellm)."),
    name: Optional[str] = typer.Option(None, "--name", help="Worker name (default: generated)."),
) -> None:
    """Process jobs and warm-ups from the Redis queue (run one per machine or core budget; they share it)."""
    from proxy.config import ConfigError, load_config
    from proxy.jobs.worker import run_worker
    from proxy.serving.warmup_runners import install_worker

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        fail(str(exc))
    install_worker(cfg, store, name)  # the queue also carries demonstration warm-ups
    run_worker(redis, store_url=store, config=cfg, queue=queue, burst=burst, pe_backend=pe_backend,
               heartbeat_interval=heartbeat, name=name)


def register(app: typer.Typer) -> None:
    """Add ``jobs`` and ``worker`` to the ``dpicl`` app."""
    app.add_typer(jobs_app, name="jobs")
    app.command("worker")(worker)
