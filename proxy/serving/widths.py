"""The prompt width of a task: set by hand (``generation.max_prompt_tokens: <int>``) or derived
from the dataset's DP row-length release (``auto``; docs/privacy.md, "The prompt width").

``auto`` = longest public prompt of the task + N x (the released 95th percentile of the units'
longest row + the template tokens of one example), in the generator's own token counting. The
release is charged once per (dataset version, generator) by
:meth:`proxy.budget.BudgetService.width_release`; everything here is post-processing of it and
public configuration. ``fit_share`` is the DP estimate of the share of units whose longest row fits
the released quantile (never an exact count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aggregation.prompts import Example, TaskPrompt
from aggregation.quantile import WIDTH_QUANTILE, WidthRelease, derived_width
from proxy.task_config import DEFAULT_PROMPT_TOKENS, TaskConfig
from proxy.errors import APIError
from proxy.serving.generators import TokenCounting

#: Tokens allowed per example for tokens merging across its boundaries (public).
BOUNDARY_MARGIN = 2


@dataclass(frozen=True)
class Width:
    """A task's prompt width and where it came from (public or DP-derived values only)."""

    #: Tokens of one generation prompt; None while an ``auto`` width awaits its release (dry run).
    width: int | None
    auto: bool
    #: The released quantile (tokens of a unit's longest row) and the DP share of units within it.
    quantile: int | None = None
    fit_share: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ``prompt_width`` object of warm-up views and payloads."""
        return {"width": self.width, "auto": self.auto, "quantile": self.quantile,
                "p": WIDTH_QUANTILE if self.auto else None,
                "fit_share": None if self.fit_share is None else round(self.fit_share, 4)}


def is_auto(task: TaskConfig) -> bool:
    """Whether the task derives its width from the data (and so needs the release)."""
    return task.generation.max_prompt_tokens == "auto" and not task.generation.public_only


def fixed_width(task: TaskConfig) -> Width:
    """The width of a task that needs no release (hand-set, or public-only)."""
    w = task.generation.max_prompt_tokens
    return Width(w if isinstance(w, int) else DEFAULT_PROMPT_TOKENS, auto=False)


def counter(task: TaskConfig, source: TokenCounting) -> Any:
    """The generator's public token counting of one text; 400 (before any charge) when the
    generator cannot count tokens, since then there is nothing to derive a width in."""
    if source.count_tokens("a") is None:
        raise APIError(400, f"task {task.name!r}: max_prompt_tokens 'auto' needs a generator that counts tokens; "
                            f"set a number", "invalid_generation")

    def count(text: str) -> int:
        return int(source.count_tokens(text) or 0)

    return count


def from_release(task: TaskConfig, source: TokenCounting, prompt: TaskPrompt, labels: list[str],
                 release: WidthRelease) -> Width:
    """The derived width of ``task`` (post-processing of ``release`` and public text)."""
    count = counter(task, source)
    names = labels or [""]
    public = max(count(prompt.public_prompt(lab)) for lab in names)
    example = max(count(prompt.generation_example(Example("", lab))) for lab in names) + BOUNDARY_MARGIN
    q = release.quantile(WIDTH_QUANTILE)
    width = derived_width(public, example, task.generation.shots_per_subset, q)
    return Width(width, auto=True, quantile=q, fit_share=release.share_within(q))
