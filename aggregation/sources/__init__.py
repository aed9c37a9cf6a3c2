"""Next-token distribution backends: a local transformers model and OpenAI-compatible APIs.
Imports numpy, torch/transformers and litellm; from the project, aggregation modules only (never proxy).
"""

from aggregation.sources.base import DecodeState, NextTokenSource, Token

__all__ = ["DecodeState", "NextTokenSource", "Token"]
