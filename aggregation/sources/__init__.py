"""Next-token distribution backends: a local transformers model and OpenAI-compatible APIs."""

from aggregation.sources.base import DecodeState, NextTokenSource, Token

__all__ = ["DecodeState", "NextTokenSource", "Token"]
