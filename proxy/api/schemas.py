"""Pydantic models at the HTTP boundary.

OpenAI request models validate only what the proxy relies on and allow every other field, so
requests are forwarded unchanged (the original dict is forwarded, not a re-serialisation).
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Any = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    prompt: str | list[Any]
    stream: bool | None = False


class BudgetUpdate(BaseModel):
    """``PUT /admin/datasets/{id}/budget``."""

    model_config = ConfigDict(extra="forbid")

    epsilon: float
    delta: float | None = None

    @field_validator("epsilon")
    @classmethod
    def _eps(cls, v: float) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError("epsilon must be a positive finite number")
        return v

    @field_validator("delta")
    @classmethod
    def _delta(cls, v: float | None) -> float | None:
        if v is not None and not (0 < v < 1):
            raise ValueError("delta must be in (0, 1)")
        return v


class WarmRequest(BaseModel):
    """``POST /admin/tasks/{task}/demos``."""

    model_config = ConfigDict(extra="forbid")

    dry_run: bool = False


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
