"""Prompt formats of a task, derived from one set of fields.

Generation conditions the new text on its label, so the label header comes first
("Answer type: location / Question: ..."). Serving shows the downstream model the usual order
("Question: ... / Answer type: location"). Both come from the same fields, so they cannot drift.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal, Sequence

#: What the generation prompt shows for a label: its word (``label_words``, else the label), or a
#: neutral public alias ("type A", "type B", ...) while the injected demonstrations keep the word.
LabelHint = Literal["word", "alias"]


@dataclass(frozen=True)
class Example:
    """One labelled text (private record or generated demonstration).

    ``unit`` names the record's privacy unit (e.g. a customer id); records without one are their
    own unit (see :mod:`aggregation.units`).
    """

    text: str
    label: str
    unit: str | None = None


@dataclass(frozen=True)
class TaskPrompt:
    """The fields a task's prompts are built from.

    ``input_prefix`` introduces the text ("Question:"), ``label_prefix`` the label
    ("Answer type:"); a space separates prefix and value. Headers end without a trailing space so
    that BPE models generate the space together with the first word, as in their training data. ``label_words`` optionally maps a dataset label to the word shown to the
    model (e.g. ``LOC`` -> ``location``).
    """

    instruction: str
    input_prefix: str = "Text:"
    label_prefix: str = "Label:"
    label_words: tuple[tuple[str, str], ...] = ()

    #: Generation only: a public alias per label shown instead of its word (see :func:`neutral_aliases`).
    label_aliases: tuple[tuple[str, str], ...] = ()

    def word(self, label: str) -> str:
        """The word shown to the model for ``label``."""
        return dict(self.label_words).get(label, label)

    def with_hint(self, hint: LabelHint, domain: Sequence[str]) -> "TaskPrompt":
        """This prompt generating with label words (``word``) or neutral aliases over ``domain``.

        ``domain`` is the public label domain (the task's declared labels, in their declared order),
        never labels read from rows, so the aliases are public configuration.
        """
        if hint == "word":
            return replace(self, label_aliases=())
        if hint == "alias":
            return replace(self, label_aliases=neutral_aliases(domain))
        raise ValueError("label hint must be 'word' or 'alias'")

    def generation_word(self, label: str) -> str:
        """The word the generation prompt shows for ``label`` (its alias, if it has one)."""
        return dict(self.label_aliases).get(label) or self.word(label)

    def generation_instruction(self) -> str:
        """The instruction as generation shows it: every aliased label's word, as a whole word,
        replaced by its alias (an instruction that lists the words would otherwise show them)."""
        text = self.instruction
        for label, alias in self.label_aliases:
            text = re.sub(rf"(?<!\w){re.escape(self.word(label))}(?!\w)", alias, text)
        return text

    # -- generation format (label first) -------------------------------------------------------
    def generation_example(self, ex: Example) -> str:
        return f"{self.label_prefix} {self.generation_word(ex.label)}\n{self.input_prefix} {_one_line(ex.text)}\n\n"

    def generation_header(self, label: str) -> str:
        return f"{self.label_prefix} {self.generation_word(label)}\n{self.input_prefix}"

    def shared_prefix(self) -> str:
        """The text every generation prompt of the task starts with (public: the instruction).

        A next-token source may encode it once and reuse its state across rows, steps and calls.
        It ends where the instruction ends; the rest starts with the blank line, so a BPE
        tokenizer splits prefix and rest where it would split the whole prompt anyway.
        """
        return self.generation_instruction()

    def generation_body(self, examples: Sequence[Example], label: str) -> str:
        """The generation prompt after :meth:`shared_prefix`: examples, then the label header."""
        body = "".join(self.generation_example(e) for e in examples)
        return f"\n\n{body}{self.generation_header(label)}"

    def generation_prompt(self, examples: Sequence[Example], label: str) -> str:
        """Instruction, the examples in generation format, then the header for ``label``."""
        return self.shared_prefix() + self.generation_body(examples, label)

    def public_body(self, label: str) -> str:
        """:meth:`public_prompt` without the shared prefix."""
        return self.generation_body((), label)

    def public_prompt(self, label: str) -> str:
        """The generation prompt without private examples (free to query)."""
        return self.generation_prompt((), label)

    # -- serving format (text first) ----------------------------------------------------------
    def serving_example(self, ex: Example) -> str:
        return f"{self.input_prefix} {_one_line(ex.text)}\n{self.label_prefix} {self.word(ex.label)}\n\n"

    def serving_prefix(self, demos: Sequence[Example]) -> str:
        """Instruction plus demonstrations in serving format (what gets injected)."""
        return f"{self.instruction}\n\n" + "".join(self.serving_example(d) for d in demos)

    def query(self, text: str) -> str:
        """A query in serving format, ending where the label word is expected."""
        return f"{self.input_prefix} {_one_line(text)}\n{self.label_prefix}"

    @property
    def stop(self) -> str:
        """Generated text ends at a newline (the example template's end marker)."""
        return "\n"


def neutral_aliases(domain: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``(label, "type A")``, ``(label, "type B")``, ... by position in the public label domain.

    Letters run A..Z, then AA, AB, ...; duplicates in ``domain`` keep their first position.
    """
    labels = list(dict.fromkeys(domain))
    return tuple((label, f"type {_letters(i)}") for i, label in enumerate(labels))


def _letters(i: int) -> str:
    out = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        out = chr(ord("A") + r) + out
    return out


def _one_line(text: str) -> str:
    return " ".join(text.split())
