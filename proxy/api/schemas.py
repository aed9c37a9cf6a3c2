"""Pydantic models at the HTTP boundary.

OpenAI request models validate only what the proxy relies on and allow every other field, so
requests are forwarded unchanged (the original dict is forwarded, not a re-serialisation).
Bodies are validated in pydantic's strict mode (:func:`proxy.api.common.validate_body`): ``"5"`` or
``true`` is not a number and ``"yes"`` is not a boolean, so a typo cannot silently pick a value.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from proxy.config import MAX_BUDGET_EPSILON, MIN_BUDGET_EPSILON

__all__ = ["MAX_BUDGET_EPSILON", "MIN_BUDGET_EPSILON", "check_budget"]


def check_budget(epsilon: float, delta: float | None) -> None:
    """Raise ValueError unless ``MIN_BUDGET_EPSILON <= epsilon <= MAX_BUDGET_EPSILON`` and ``0 < delta < 1``
    (the bounds :class:`BudgetUpdate` states in the OpenAPI document)."""
    if not (math.isfinite(epsilon) and MIN_BUDGET_EPSILON <= epsilon <= MAX_BUDGET_EPSILON):
        raise ValueError(f"epsilon must be a number in [{MIN_BUDGET_EPSILON:g}, {MAX_BUDGET_EPSILON:g}]")
    if delta is not None and not (math.isfinite(delta) and 0 < delta < 1):
        raise ValueError("delta must be in (0, 1)")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Any = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: StrictBool | None = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    prompt: str | list[Any]
    stream: StrictBool | None = False


class BudgetUpdate(BaseModel):
    """``PUT /admin/datasets/{id}/budget``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    epsilon: float = Field(ge=MIN_BUDGET_EPSILON, le=MAX_BUDGET_EPSILON, allow_inf_nan=False)
    delta: float | None = Field(None, gt=0, lt=1, allow_inf_nan=False)


class WarmRequest(BaseModel):
    """``POST /admin/tasks/{task}/demos`` (strict: ``"yes"`` or ``1`` is not a switch)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    #: Only price the warm-up (nothing queued, charged or read).
    dry_run: bool = False
    #: Block until the warm-up finishes (scripts); otherwise answer 202 at once.
    wait: bool = False


class BudgetReset(BaseModel):
    """``POST /admin/budget/{name}/reset``: an explicit, audited restart of a name's accounting."""

    model_config = ConfigDict(extra="forbid", strict=True)

    reason: str = Field(min_length=1, max_length=1000)

    @field_validator("reason")
    @classmethod
    def _reason(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("reason must not be blank")
        return v.strip()
