"""Evaluation tasks: a labelled dataset (TREC, R8 or a JSONL/CSV file) with its prompt and label
order, and the fixed held-out split into a private pool and test questions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aggregation.datasets import R8_PROMPT, TREC_PROMPT, load_r8, load_trec, read_jsonl, split
from aggregation.prompts import Example, TaskPrompt


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
    """``trec``, ``r8``, or a path to a JSONL/CSV file of ``text``/``label`` rows."""
    key = dataset.lower()
    if key == "trec":
        records, prompt = load_trec(), TREC_PROMPT
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


def held_out_split(task: Task, held_out: int = 300, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(private pool, test set) with a fixed seed; small files keep at least 3/4 for the pool."""
    size = min(held_out, len(task.records) // 4)
    if size < 1:
        raise ValueError("the dataset is too small to hold out a test set")
    return split(task.records, size, seed)
