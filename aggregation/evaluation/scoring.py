"""Scoring: each test query is classified by the model's log-probability of every label word after
``TaskPrompt.query(text)`` behind a demonstration set in serving format (the standard ICL scoring),
optionally with contextual calibration (Zhao et al., 2021: divide the label probabilities by their
mean under content-free inputs).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from aggregation.prompts import Example, TaskPrompt

#: Content-free inputs of contextual calibration.
CONTENT_FREE = ("N/A", "", "[MASK]")


class LabelScorer(Protocol):
    """Anything that gives label-word log-probabilities after a prefix and each query."""

    def logprobs(self, prefix: str, queries: Sequence[str]) -> np.ndarray:
        """``[len(queries), num_labels]`` log-probabilities of each label word after prefix+query."""
        ...


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ModelScorer:
    """Label-word log-probabilities from a local causal LM, with the shared prefix encoded once.

    The prefix (instruction + demonstrations) is the same for every query, so it is run through
    the model once and its KV cache is copied into every batch of queries. Tokenisation is done on
    the whole string ``prefix + query`` (BPE merges across the boundary, e.g. a trailing blank
    line), and the cached part is the longest token prefix all queries share, so the numbers equal
    those of a plain forward pass over each full string. Only the positions whose next token is a
    label token go through the output layer. A label word of several tokens gets one extra row per
    query holding its first tokens; its log-probability is the sum over its tokens. A BOS token
    opens every sequence when the tokenizer adds one by default (Gemma), as in
    :class:`aggregation.sources.local.LocalSource`.
    """

    def __init__(self, model: Any, tokenizer: Any, label_words: Sequence[str], batch_size: int = 16,
                 progress: bool = False):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model = model
        self.tokenizer = tokenizer
        self.label_words = list(label_words)
        # A space separates the label prefix and the word (TaskPrompt.serving_example).
        self.label_ids = [self._encode(" " + w) for w in self.label_words]
        if any(not ids for ids in self.label_ids):
            raise ValueError("every label word must encode to at least one token")
        self.batch_size = batch_size
        self.progress = progress
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad or 0)
        # A model trained with a BOS token in front (Gemma) needs it; SmolLM2's tokenizer adds none.
        from aggregation.sources.local import leading_bos

        self.bos = leading_bos(tokenizer)
        # Gemma-style final logit soft-capping (tanh) is part of the model's output distribution.
        self.softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)

    @property
    def single_token_labels(self) -> bool:
        return all(len(ids) == 1 for ids in self.label_ids)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def logprobs(self, prefix: str, queries: Sequence[str]) -> np.ndarray:
        import torch
        from tqdm.auto import tqdm

        out = np.zeros((len(queries), len(self.label_ids)), dtype=np.float64)
        if not queries:
            return out
        full = [self.bos + self._encode(prefix + q) for q in queries]
        pre = self.bos + self._encode(prefix)
        shared = min(_common_prefix(pre, f) for f in full)
        shared = max(0, min(shared, min(len(f) for f in full) - 1))  # every row keeps >= 1 own token

        # rows: (query index, tokens after the shared part, [(position, target token, label)])
        rows: list[tuple[int, list[int], list[tuple[int, int, int]]]] = []
        for i, f in enumerate(full):
            rest = f[shared:]
            last = len(rest) - 1
            rows.append((i, rest, [(last, ids[0], j) for j, ids in enumerate(self.label_ids)]))
            for j, ids in enumerate(self.label_ids):
                if len(ids) > 1:
                    rows.append((i, rest + ids[:-1], [(last + t, ids[t], j) for t in range(1, len(ids))]))

        from aggregation.sources.local import cache_arg, cache_of

        base = self.model.base_model
        head = self.model.get_output_embeddings()
        cache_kw = cache_arg(base)

        order = sorted(range(len(rows)), key=lambda r: len(rows[r][1]))  # less padding per batch
        batches = [order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        with torch.inference_mode():
            past = None
            if shared > 0:
                past = cache_of(base(input_ids=torch.tensor([full[0][:shared]], dtype=torch.long), use_cache=True))
            for batch in tqdm(batches, desc="scoring", leave=False, disable=not self.progress):
                width = max(len(rows[r][1]) for r in batch)
                n = len(batch)
                ids = torch.full((n, width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((n, shared + width), dtype=torch.long)
                mask[:, :shared] = 1
                for b, r in enumerate(batch):
                    toks = rows[r][1]
                    ids[b, :len(toks)] = torch.tensor(toks, dtype=torch.long)
                    mask[b, shared:shared + len(toks)] = 1  # right padding: pads come after
                positions = (shared + torch.arange(width)).unsqueeze(0).expand(n, -1)
                cache = None
                if past is not None:
                    cache = copy.deepcopy(past)
                    cache.batch_repeat_interleave(n)
                hidden = base(input_ids=ids, attention_mask=mask, position_ids=positions,
                              use_cache=cache is not None, **{cache_kw: cache}).last_hidden_state
                bi, pi, tgt, qi, lab = [], [], [], [], []
                for b, r in enumerate(batch):
                    for pos, token, j in rows[r][2]:
                        bi.append(b), pi.append(pos), tgt.append(token), qi.append(rows[r][0]), lab.append(j)
                # Only the positions whose next token is a label token go through the output layer
                # (Gemma's vocabulary is 262k: all positions would cost more than the forward pass).
                logits = head(hidden[torch.tensor(bi), torch.tensor(pi)]).double()
                if self.softcap:
                    logits = torch.tanh(logits / self.softcap) * self.softcap
                picked = torch.log_softmax(logits, dim=-1)[torch.arange(len(tgt)), torch.tensor(tgt)]
                np.add.at(out, (np.asarray(qi), np.asarray(lab)), picked.numpy())
        return out


def _softmax(logprobs: np.ndarray) -> np.ndarray:
    z = np.asarray(logprobs, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def calibrated_probs(logprobs: np.ndarray, content_free_logprobs: np.ndarray) -> np.ndarray:
    """Contextual calibration: label probabilities divided by their mean content-free value.

    Both inputs are ``[n, labels]`` log-probabilities; each row is first renormalised over the
    labels. The result rows are renormalised again (argmax is unaffected by that).
    """
    p = _softmax(logprobs)
    p_cf = _softmax(content_free_logprobs).mean(axis=0)
    q = p / p_cf
    return q / q.sum(axis=-1, keepdims=True)


@dataclass
class Scored:
    """Label log-probabilities of the test queries and of the content-free inputs."""

    logprobs: np.ndarray
    content_free: np.ndarray

    def predictions(self, calibrate: bool = False) -> np.ndarray:
        """Index of the predicted label of every test query."""
        if calibrate:
            return np.argmax(calibrated_probs(self.logprobs, self.content_free), axis=1)
        return np.argmax(self.logprobs, axis=1)


def score_queries(scorer: LabelScorer, prompt: TaskPrompt, demos: Sequence[Example], texts: Sequence[str]) -> Scored:
    """Score ``texts`` (and the content-free inputs) after the serving prefix of ``demos``."""
    prefix = prompt.serving_prefix(demos)
    queries = [prompt.query(t) for t in texts] + [prompt.query(c) for c in CONTENT_FREE]
    lp = np.asarray(scorer.logprobs(prefix, queries), dtype=np.float64)
    return Scored(lp[:len(texts)], lp[len(texts):])


def accuracy(predictions: Sequence[int] | np.ndarray, gold: Sequence[int] | np.ndarray) -> float:
    """Fraction of equal entries."""
    p, g = np.asarray(predictions), np.asarray(gold)
    if p.shape != g.shape or p.size == 0:
        raise ValueError("predictions and gold labels must be non-empty and of equal length")
    return float((p == g).mean())
