"""Evaluation tasks: a labelled dataset (TREC, R8 or a JSONL/CSV file) with its prompt and label
order, and the fixed held-out split into a private pool and test questions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aggregation.datasets import R8_PROMPT, TREC_PROMPT, load_r8, load_trec, read_jsonl, split
from aggregation.prompts import Example, TaskPrompt

#: ``trec-opaque``: TREC's coarse classes shown to the model as unrelated words, so that neither the
#: public prompt nor the model's prior knows what a label means; only the private examples do.
#: Fixed (changing it changes every trec-opaque number). Each word is one token with its leading
#: space in the SmolLM2 tokenizer, and the six tokens differ (tests/test_eval.py checks both).
TREC_OPAQUE_WORDS = (
    ("NUM", "violet"),
    ("LOC", "pencil"),
    ("HUM", "cactus"),
    ("DESC", "marble"),
    ("ENTY", "anchor"),
    ("ABBR", "velvet"),
)

TREC_OPAQUE_PROMPT = TaskPrompt(
    instruction=(
        "Classify the questions into one of these categories: violet, pencil, cactus, marble, anchor, or velvet."
    ),
    input_prefix="Question:",
    label_prefix="Category:",
    label_words=TREC_OPAQUE_WORDS,
)


@dataclass
class Task:
    """A labelled dataset with its prompt and label order."""

    name: str
    records: list[Example]
    prompt: TaskPrompt
    labels: list[str]

    def words(self) -> list[str]:
        return [self.prompt.word(lab) for lab in self.labels]


def load_task(dataset: str) -> Task:
    """``trec``, ``trec-opaque``, ``r8``, or a path to a JSONL/CSV file of ``text``/``label`` rows."""
    key = dataset.lower()
    if key == "trec":
        records, prompt = load_trec(), TREC_PROMPT
    elif key == "trec-opaque":  # the same records and labels; only the words shown to the model differ
        records, prompt = load_trec(), TREC_OPAQUE_PROMPT
    elif key == "r8":
        records, prompt = load_r8(), R8_PROMPT
    else:
        path = Path(dataset)
        records = read_jsonl(path)
        names = sorted({r.label for r in records})
        prompt = TaskPrompt(instruction="Classify the texts into one of these labels: " + ", ".join(names) + ".")
        key = path.stem
    present = {r.label for r in records}
    ordered = [lab for lab, _ in prompt.label_words if lab in present]
    labels = ordered + sorted(present - set(ordered))
    return Task(key, records, prompt, labels)


def held_out_split(task: Task, held_out: int = 300, seed: int = 0,
                   evaluator: int = 0) -> tuple[list[Example], list[Example]]:
    """(private pool, test set) with a fixed seed; small files keep at least 3/4 for the pool.

    With ``evaluator`` > 0 that many further records (at most a quarter of what is left) are also
    taken out of the pool, to train the fidelity evaluator (:func:`evaluator_split`); the test set
    is the same either way.
    """
    size = min(held_out, len(task.records) // 4)
    if size < 1:
        raise ValueError("the dataset is too small to hold out a test set")
    pool, test = split(task.records, size, seed)
    if evaluator > 0:
        pool, _ = split(pool, min(evaluator, len(pool) // 4), seed + 1)
    return pool, test


def evaluator_split(task: Task, held_out: int, seed: int, evaluator: int) -> list[Example]:
    """The records that train the fidelity evaluator: disjoint from the private pool and the test set.

    A dataset may hold the same text twice (TREC does); records whose text is also in the pool or
    the test set are dropped, so the evaluator has seen no private or test text.
    """
    pool, test = split(task.records, min(held_out, len(task.records) // 4), seed)
    pool, train = split(pool, min(evaluator, len(pool) // 4), seed + 1)
    seen = {r.text for r in pool} | {r.text for r in test}
    return [r for r in train if r.text not in seen]
