"""The ``dpicl`` command line (typer). Each command group lives in its own ``proxy.cli_*`` module."""

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

from proxy import cli_engine, cli_eval, cli_jobs, cli_serve  # noqa: E402  (after the env default above)

for _module in (cli_engine, cli_serve, cli_eval, cli_jobs):
    _module.register(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
