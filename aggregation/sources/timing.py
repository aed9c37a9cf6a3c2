"""A next-token source wrapper that adds up the seconds spent inside the model.

Used to show where a generation's time goes (model forward against sampling, noise and the rest).
The wrapper changes no numbers and no batch: every call is passed through unchanged. The seconds
it counts depend on private data (when a demonstration stops, how long prompts are), so they are
for admins and benchmarks only.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from aggregation.sources.base import DecodeState, NextTokenSource, Token


class TimedSource(NextTokenSource):
    """``source`` with :attr:`seconds` = wall time spent in ``open``, ``advance``, ``probs`` and
    ``top_tokens`` (where a batched local model runs its forward passes)."""

    def __init__(self, source: NextTokenSource):
        self.inner = source
        self.seconds = 0.0
        self.caches_state = source.caches_state
        self.rows_independent = source.rows_independent

    def _timed(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started

    def open(self, prompts: Sequence[str], suffix: Sequence[Token] = (), keep_state: bool = False,
             width: int | None = None, prefix: str = "") -> DecodeState:
        state = self._timed(self.inner.open, prompts, suffix, keep_state=keep_state, width=width, prefix=prefix)
        return _TimedState(self, state)

    def count_tokens(self, text: str, prefix: str = "") -> int | None:
        return self.inner.count_tokens(text, prefix=prefix)

    def decode(self, tokens: Sequence[Token]) -> str:
        return self.inner.decode(tokens)

    def vocabulary(self) -> Sequence[Token] | None:
        return self.inner.vocabulary()

    def is_end(self, token: Token) -> bool:
        return self.inner.is_end(token)

    def __getattr__(self, name: str) -> Any:
        # Anything else (``encode`` of a local source, its model) is the inner source's.
        return getattr(self.inner, name)


class _TimedState(DecodeState):
    def __init__(self, owner: TimedSource, state: DecodeState):
        self._owner = owner
        self._state = state

    @property
    def calls(self) -> int:  # type: ignore[override]
        return self._state.calls

    def probs(self, candidates: Sequence[Token] | None) -> np.ndarray:
        return self._owner._timed(self._state.probs, candidates)

    def top_tokens(self, k: int) -> list[Token]:
        return self._owner._timed(self._state.top_tokens, k)

    def advance(self, token: Token) -> None:
        self._owner._timed(self._state.advance, token)
