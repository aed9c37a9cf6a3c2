"""The ``dpicl`` command line: the typer app and ``main`` here, one module per command group (serve,
engine: account/generate, evaluate: eval, data: sample datasets, and the admin API clients datasets,
budget, tasks, keys, jobs/worker; common: shared options; http: the admin API client; output:
tables and JSON). May import any proxy or aggregation module, lazily inside commands so that
``--help`` stays fast.
"""

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

from proxy.cli import budget, data, datasets, engine, evaluate, jobs, keys, serve, tasks  # noqa: E402

for _module in (engine, serve, data, datasets, budget, tasks, keys, jobs, evaluate):
    _module.register(app)


def main() -> None:
    """Console-script entry point."""
    app()
