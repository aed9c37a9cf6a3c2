"""Small pieces shared by the ``dpicl`` command modules."""

from __future__ import annotations

import math
from enum import Enum

import typer


class ModeOpt(str, Enum):
    resample = "resample"
    fixed = "fixed"
    block = "block"


class MechanismOpt(str, Enum):
    gaussian = "gaussian"
    exponential = "exponential"
    public_prior = "public_prior"


class ClusteringOpt(str, Enum):
    dp = "dp"
    public = "public"


class PrecisionOpt(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    int8 = "int8"


def fail(message: str) -> None:
    """Print ``error: message`` on stderr and exit with status 2 (bad input)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def require_finite(option: str, value: float | None) -> None:
    """One-line error (exit 2) when an option's number is inf or nan, instead of a traceback later."""
    if value is not None and not math.isfinite(value):
        fail(f"{option} must be a finite number, not {value}")
