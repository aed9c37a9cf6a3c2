"""Quality check of a synthetic dataset: train a simple classifier on it, test it on real data.

TF-IDF (word uni- and bigrams) + logistic regression is trained once on the synthetic rows and
once on the real private pool, and both are scored on the same held-out split of real data. Only
accuracies and row counts are returned (no text), so the result may leave the server.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from aggregation.datasets import split
from aggregation.prompts import Example


@dataclass
class QualityReport:
    """Accuracies on the real held-out split (no text)."""

    synthetic_accuracy: float | None  # None if the synthetic rows have fewer than two labels
    real_accuracy: float | None  # None if the real training pool has fewer than two labels
    majority_accuracy: float  # always predicting the most frequent test label
    synthetic_rows: int
    real_train_rows: int
    test_rows: int

    def to_dict(self) -> dict:
        return asdict(self)


def train_and_score(train: Sequence[Example], test: Sequence[Example], seed: int = 0) -> float | None:
    """Accuracy on ``test`` of TF-IDF + logistic regression trained on ``train``."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    if len({ex.label for ex in train}) < 2 or not test:
        return None
    clf = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True),
                        LogisticRegression(max_iter=2000, C=10.0, random_state=seed))
    clf.fit([ex.text for ex in train], [ex.label for ex in train])
    pred = clf.predict([ex.text for ex in test])
    return float(sum(p == ex.label for p, ex in zip(pred, test)) / len(test))


def evaluate(synthetic: Sequence[Example], real: Sequence[Example], test: Sequence[Example] | None = None,
             test_fraction: float = 0.2, seed: int = 0) -> QualityReport:
    """Score classifiers trained on ``synthetic`` and on the real pool on held-out real data.

    With ``test`` given, ``real`` is the whole training pool (use this when the synthetic data was
    generated from ``real``, so the test rows never influenced it). Otherwise ``real`` is split
    (fixed ``seed``) into a pool and a test set of ``test_fraction``.
    """
    real = list(real)
    if test is not None:
        pool, test = real, list(test)
        if not pool or not test:
            raise ValueError("need real training rows and test rows")
    else:
        if not 0 < test_fraction < 1:
            raise ValueError("test_fraction must be in (0, 1)")
        if len(real) < 2:
            raise ValueError("need at least two real rows")
        n_test = max(1, int(round(len(real) * test_fraction)))
        pool, test = split(real, n_test, seed)
    counts: dict[str, int] = {}
    for ex in test:
        counts[ex.label] = counts.get(ex.label, 0) + 1
    majority = max(counts.values()) / len(test)
    return QualityReport(
        synthetic_accuracy=train_and_score(synthetic, test, seed),
        real_accuracy=train_and_score(pool, test, seed),
        majority_accuracy=float(majority),
        synthetic_rows=len(synthetic), real_train_rows=len(pool), test_rows=len(test),
    )
