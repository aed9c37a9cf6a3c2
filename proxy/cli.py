"""The ``dpicl`` command line (typer). Each command group lives in its own ``proxy.cli_*`` module."""

from __future__ import annotations

import importlib
import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import typer

app = typer.Typer(
    name="dpicl",
    help="Privacy-preserving in-context-learning proxy: DP few-shot demonstrations behind an OpenAI-compatible API.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

#: Modules that register commands on ``app`` through a ``register(app)`` function.
COMMAND_MODULES = ["proxy.cli_engine", "proxy.cli_serve", "proxy.cli_eval", "proxy.cli_jobs"]

for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(_name)
    except ModuleNotFoundError as exc:  # a command group not built yet in this checkout
        if exc.name != _name:
            raise
        continue
    _module.register(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
