"""Local transformers causal LM as a next-token source (the embedded default).

Rows are batched with padding and an attention mask, only the last position's logits are computed,
and with ``keep_state=True`` the KV cache is kept so each new token costs one batched decode step.

Row layout: ``[prefix][padding][rest of the prompt + suffix]``. The prefix is public text shared by
every row (a task's instruction); its keys and values are computed once and kept in a small LRU
keyed by its token ids, then reused across rows, steps and calls, so a batch only runs the model
over the columns after it. The last prefix token is always re-encoded with the rest, so every row
ends in a real token and the shapes depend only on the public width and the prefix. Position ids
run contiguously over the real tokens, so padding changes no row's numbers (up to float rounding).
Nothing derived from a private prompt is ever cached beyond the state that holds it.

Special tokens follow the tokenizer's own convention: when it adds a BOS token by default (Gemma
does; SmolLM2 does not), the first segment of a row - the prefix, or the prompt when there is no
prefix - starts with it, and no other segment does.
"""

from __future__ import annotations

import inspect
import threading
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from aggregation.sources.base import DecodeState, NextTokenSource, Token
from aggregation.sources.models import (  # noqa: F401 - re-exported: callers import them from here
    GEMMA3_NAME,
    SMOLLM2_NAME,
    cache_dir,
    ensure_gemma3,
    ensure_smollm2,
    load_model,
    load_tokenizer,
    model_precision,
    rows_independent,
    smollm2_gguf_path,
    with_precision,
)

#: Prefix KV states kept per source (public text only; a few MB each for the offline models).
PREFIX_CACHE_SIZE = 8


def leading_bos(tokenizer: Any) -> list[int]:
    """``[bos_id]`` when the tokenizer puts a BOS token in front of text by default, else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = list(tokenizer("a")["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    if with_special[:1] == [bos] and plain[:1] != [bos]:
        return [int(bos)]
    return []


def _sliding_window(config: Any) -> int | None:
    """Smallest sliding attention window of the model, or ``None`` when every layer sees everything."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


class _PrefixCache:
    """A small thread-safe LRU from prefix token ids to per-layer ``(keys, values)`` of batch 1."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[tuple[int, ...], list[tuple[Any, Any]]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[int, ...]) -> list[tuple[Any, Any]] | None:
        with self._lock:
            kv = self._items.get(key)
            if kv is not None:
                self._items.move_to_end(key)
                self.hits += 1
            return kv

    def put(self, key: tuple[int, ...], kv: list[tuple[Any, Any]]) -> None:
        with self._lock:
            self.misses += 1
            self._items[key] = kv
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class LocalSource(NextTokenSource):
    """Next-token distributions from a local causal LM (CPU by default).

    ``prefix_cache_size`` prefixes' KV states are kept (0 turns the prefix cache off, which gives
    the plain left-padded layout).
    """

    caches_state = True

    def __init__(self, model: Any, tokenizer: Any, prefix_cache_size: int = PREFIX_CACHE_SIZE):
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        ends = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ends = list(ends) if isinstance(ends, (list, tuple)) else [ends]
        self._end_ids = {int(i) for i in (tokenizer.eos_token_id, *ends) if i is not None}
        # (The input embeddings: a dynamically quantised output layer has no plain weight tensor.)
        self._vocab_size = int(model.get_input_embeddings().weight.shape[0])
        self.bos = leading_bos(tokenizer)
        self.window = _sliding_window(model.config)
        self._cache_arg = cache_arg(model)
        self.prefixes = _PrefixCache(prefix_cache_size)
        self.precision = model_precision(model)
        self.rows_independent = rows_independent(self.precision)

    @classmethod
    def from_pretrained(cls, name_or_dir: str | None = None, precision: str = "float32") -> "LocalSource":
        """Load SmolLM2 (default), ``"gemma3-270m"``, or a local model directory, at ``precision``."""
        model, tok = load_model(name_or_dir, precision)
        return cls(model, tok)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens).

        Deliberately uncached: prompts hold private records, and keeping them in memory after a
        step would outlive their use for nothing (tokenising 200 tokens takes well under 1 ms).
        """
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def segments(self, prompts: Sequence[str], suffix: Sequence[Token] = (),
                 prefix: str = "") -> tuple[list[int], list[list[int]]]:
        """``(prefix ids, [rest ids per row])`` as :meth:`open` lays them out (BOS on the first segment)."""
        tail = [int(t) for t in suffix]
        if prefix:
            return self.bos + self.encode(prefix), [self.encode(p) + tail for p in prompts]
        return [], [self.bos + self.encode(p) + tail for p in prompts]

    def open(self, prompts: Sequence[str], suffix: Sequence[Token] = (), keep_state: bool = False,
             width: int | None = None, prefix: str = "") -> "LocalState":
        head, bodies = self.segments(prompts, suffix, prefix)
        if width is not None and any(len(head) + len(b) > width for b in bodies):
            raise ValueError(f"a prompt is longer than the batch width of {width} tokens")
        return LocalState(self, head, bodies, keep_state, width)

    def count_tokens(self, text: str, prefix: str = "") -> int:
        """Tokens of the row ``prefix + text`` as :meth:`open` encodes it (BOS included)."""
        head, bodies = self.segments([text], (), prefix)
        return len(head) + len(bodies[0])

    def decode(self, tokens: Sequence[Token]) -> str:
        return self.tokenizer.decode([int(t) for t in tokens], skip_special_tokens=True)

    def vocabulary(self) -> Sequence[Token]:
        return range(self._vocab_size)  # type: ignore[return-value]

    def is_end(self, token: Token) -> bool:
        return int(token) in self._end_ids

    # -- model calls --------------------------------------------------------------------------
    def can_share_prefix(self, prefix_len: int, width: int) -> bool:
        """Whether rows of ``width`` slots may keep a cached prefix of ``prefix_len`` tokens.

        With a sliding attention window, padding between prefix and rest would push real tokens
        out of the window early, so the prefix layout is used only while every slot is in it.
        """
        if self.prefixes.size <= 0 or prefix_len < 1:
            return False
        return self.window is None or width <= self.window

    def prefix_cache(self, ids: Sequence[int], batch: int) -> Any:
        """A fresh KV cache holding the state of ``ids`` (public text) for each of ``batch`` rows."""
        import torch
        from transformers import DynamicCache

        key = tuple(int(i) for i in ids)
        kv = self.prefixes.get(key)
        if kv is None:
            with torch.inference_mode():
                x = torch.tensor([key], dtype=torch.long)
                out = self.forward(x, torch.ones_like(x), torch.arange(len(key)).unsqueeze(0), None, True)
            kv = [(layer.keys, layer.values) for layer in cache_of(out).layers]
            self.prefixes.put(key, kv)
        with torch.inference_mode():
            cache = DynamicCache(config=self.model.config)
            for i, (k, v) in enumerate(kv):  # update() copies: the cached tensors stay untouched
                cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), i)
        return cache

    def forward(self, ids: Any, mask: Any, positions: Any, cache: Any, use_cache: bool) -> Any:
        """One model call returning the last position's logits (and the cache when asked)."""
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                          use_cache=use_cache or cache is not None, logits_to_keep=1,
                          **{self._cache_arg: cache})


class TokenizerCounter:
    """:meth:`LocalSource.count_tokens` from the tokenizer alone, without the model's weights: what
    deriving a prompt width needs when nothing is generated (the same numbers, tested)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.bos = leading_bos(tokenizer)

    def count_tokens(self, text: str, prefix: str = "") -> int:
        """Tokens of the row ``prefix + text`` (BOS included), as :meth:`LocalSource.open` encodes it."""
        def n(s: str) -> int:
            return len(self.tokenizer(s, add_special_tokens=False)["input_ids"])

        return len(self.bos) + (n(prefix) if prefix else 0) + n(text)


def cache_arg(model: Any) -> str:
    """The keyword ``model.forward`` takes its KV cache by: transformers 5 renamed
    ``past_key_values`` to ``cache`` (the old name warns on every call until 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(out: Any) -> Any:
    """The KV cache of a model output, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class LocalState(DecodeState):
    """A padded batch ``[prefix][padding][rest]`` with an attention mask; optional KV cache across steps."""

    def __init__(self, source: LocalSource, head: list[int], bodies: list[list[int]], keep_state: bool,
                 width: int | None = None, share_prefix: bool = True):
        import torch

        self.source = source
        self.keep_state = keep_state
        self.calls = 0
        self._head = head
        self._bodies = bodies
        n = len(bodies)
        width = width if width is not None else max(1, max(len(head) + len(b) for b in bodies))
        self._width = width
        # The cached part is the prefix without its last token, which is re-encoded with the rest.
        cached = len(head) - 1 if share_prefix and source.can_share_prefix(len(head) - 1, width) else 0
        self._cached = cached
        ids = torch.full((n, width), source.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        if cached:
            ids[:, :cached] = torch.tensor(head[:cached], dtype=torch.long)
            mask[:, :cached] = 1
        for i, b in enumerate(bodies):
            seg = head[cached:] + b
            if seg:
                ids[i, width - len(seg):] = torch.tensor(seg, dtype=torch.long)
                mask[i, width - len(seg):] = 1
        self._mask = mask
        # A source whose rows are not computed independently runs one row per forward, each
        # with its own cache (see ``aggregation.sources.models.rows_independent``).
        self._rowwise = not source.rows_independent
        if not cached:
            self._past: Any = [None] * n if self._rowwise else None
        elif self._rowwise:
            self._past = [source.prefix_cache(head[:cached], 1) for _ in range(n)]
        else:
            self._past = source.prefix_cache(head[:cached], n)
        self._logits = self._forward(ids[:, cached:], mask)

    def _forward(self, ids: Any, mask: Any) -> np.ndarray:
        import torch

        # Contiguous over real tokens: padding slots repeat their left neighbour's position.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        with torch.inference_mode():
            if self._rowwise:
                outs = [self.source.forward(ids[i:i + 1], mask[i:i + 1], positions[i:i + 1], self._past[i],
                                            self.keep_state) for i in range(ids.shape[0])]
                logits = torch.cat([o.logits[:, -1, :] for o in outs]).double()
                past: Any = [cache_of(o) for o in outs] if self.keep_state else [None] * len(outs)
            else:
                out = self.source.forward(ids, mask, positions, self._past, self.keep_state)
                logits = out.logits[:, -1, :].double()
                past = cache_of(out) if self.keep_state else None
            probs = torch.softmax(logits, dim=-1).numpy()
        self.calls += 1
        self._past = past
        return probs

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

        self._bodies = [b + [int(token)] for b in self._bodies]
        self._width += 1
        window = self.source.window
        if not self.keep_state or (self._cached and window is not None and self._width > window):
            # Re-encode everything: without a cache (what resample mode does anyway), or when a
            # sliding window would no longer cover the padded layout (then without the prefix gap).
            fresh = LocalState(self.source, self._head, self._bodies, self.keep_state, self._width,
                               share_prefix=not self.keep_state)
            self._logits, self.calls = fresh._logits, self.calls + fresh.calls
            self._mask, self._past, self._cached = fresh._mask, fresh._past, fresh._cached
            return
        n = self._mask.shape[0]
        self._mask = torch.cat([self._mask, torch.ones((n, 1), dtype=torch.long)], dim=1)
        ids = torch.full((n, 1), int(token), dtype=torch.long)
        self._logits = self._forward(ids, self._mask)
