"""The ``dpicl`` command line: the typer app and ``main``; one module per command group (serve, engine,
evaluate, data, datasets, budget, audit, tasks, keys, jobs), ``http`` (the admin API client) and ``output``.
May import any proxy or aggregation module, lazily inside commands so that ``--help`` stays fast."""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import typer

app = typer.Typer(
    name="dpicl",
    help="Privacy-preserving in-context-learning proxy: DP few-shot demonstrations behind an OpenAI-compatible API.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

from proxy.cli import audit, budget, data, datasets, engine, evaluate, jobs, keys, serve, tasks  # noqa: E402

for _module in (engine, serve, data, datasets, budget, audit, tasks, keys, jobs, evaluate):
    _module.register(app)


def main() -> None:
    """Console-script entry point."""
    app()
