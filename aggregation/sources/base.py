"""The interface every next-token backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence, Union

import numpy as np

#: A token: an integer id for local models, the token's text for API providers.
Token = Union[int, str]


class DecodeState(ABC):
    """A batch of prompts being decoded together, one token appended to all of them per step."""

    #: Number of model calls made so far (one batched forward counts once).
    calls: int = 0

    @abstractmethod
    def probs(self, candidates: Sequence[Token] | None) -> np.ndarray:
        """Next-token probabilities of every prompt, shape ``[num_prompts, len(candidates)]``.

        Values are the model's probabilities restricted to ``candidates`` and *not* renormalised
        (the mechanism does that). ``None`` means the full vocabulary, in :meth:`vocabulary` order.
        """

    @abstractmethod
    def top_tokens(self, k: int) -> list[Token]:
        """The ``k`` most likely next tokens of the first prompt (used on the public prompt)."""

    @abstractmethod
    def advance(self, token: Token) -> None:
        """Append ``token`` to every prompt."""


class NextTokenSource(ABC):
    """A model that gives next-token distributions for batches of prompts."""

    #: Whether :meth:`open` with ``keep_state=True`` avoids re-encoding on :meth:`DecodeState.advance`.
    caches_state: bool = False
    #: Whether each row of a batch is computed from that row alone. The public prompt may ride in
    #: the private rows' batch only then (dynamic int8 quantisation scales by the whole batch).
    rows_independent: bool = True

    @abstractmethod
    def open(self, prompts: Sequence[str], suffix: Sequence[Token] = (), keep_state: bool = False,
             width: int | None = None, prefix: str = "") -> DecodeState:
        """Start decoding ``prefix + prompt + suffix`` for every prompt.

        ``prefix`` is public text shared by every row (a task's instruction). It is tokenised on its
        own, so a backend may encode it once and reuse its state across rows, steps and calls.
        ``suffix`` holds the already generated tokens.

        ``width`` (batched local backends): pad every row (prefix included) to exactly this many
        tokens, so that the batch's shape does not depend on the prompts' lengths. Rows longer than
        ``width`` are an error. Backends without batching ignore it.
        """

    def count_tokens(self, text: str, prefix: str = "") -> int | None:
        """Tokens of the row ``prefix + text`` as :meth:`open` would send it, or ``None`` if unknown.

        For fitting rows into a budget. Local backends count exactly (the prefix is tokenised on
        its own, special tokens included); API backends return a public upper bound.
        """
        return None

    @abstractmethod
    def decode(self, tokens: Sequence[Token]) -> str:
        """Text of a token sequence."""

    def vocabulary(self) -> Sequence[Token] | None:
        """All tokens, or ``None`` when the backend cannot score the full vocabulary."""
        return None

    def is_end(self, token: Token) -> bool:
        """Whether ``token`` ends a text (end-of-sequence)."""
        return False
