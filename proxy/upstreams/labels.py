"""Label answers of the built-in local upstream: for a task with ``answer: label`` the reply is the
label word the model scores highest after the prompt, not free text.

This is the standard in-context-learning read-out (the one ``aggregation.evaluation.scoring`` uses
to measure accuracy): the log-probability of each label word's tokens, summed, after the prompt;
the highest wins. A completion prompt in the task's format ends with the label prefix
(``...\\nAnswer type:``), so a word is scored with a leading space, exactly as the evaluation does;
in a chat the answer opens the assistant's turn, so it is scored as written.

The scoring is not shared with ``aggregation.evaluation.scoring`` because no module may be imported
by both (tests/test_layout.py: proxy/upstreams imports only proxy/upstreams, and aggregation nothing
of proxy), so tests/test_upstreams.py checks that the two give the same numbers instead.

The words are public task configuration; the prompt carries private text (DP demonstrations and
the client's input), which nothing here logs or puts into an error.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator, Sequence

from proxy.upstreams.base import DONE, dumps


def word_token_ids(tok: Any, words: Sequence[str], chat: bool) -> list[list[int]]:
    """Token ids of each candidate answer (a leading space after a completion prompt's label prefix)."""
    out = [list(tok((w if chat else " " + w), add_special_tokens=False)["input_ids"]) for w in words]
    if any(not ids for ids in out):
        raise ValueError("every label word must encode to at least one token")
    return out


def score_words(model: Any, prompt_ids: list[int], candidates: list[list[int]]) -> list[float]:
    """Summed log-probability of each candidate's tokens after ``prompt_ids``, in one batched forward
    pass (right-padded rows; the padding sits after every scored position, so it changes nothing)."""
    import torch

    rows = [prompt_ids + ids[:-1] for ids in candidates]
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    logp = torch.log_softmax(logits, dim=-1)
    start = len(prompt_ids) - 1  # the position whose next token is a candidate's first token
    return [float(sum(logp[i, start + t, tok] for t, tok in enumerate(cand))) for i, cand in enumerate(candidates)]


def best_word(model: Any, tok: Any, prompt_ids: list[int], words: Sequence[str], chat: bool) -> str:
    """The label word with the highest summed log-probability after the prompt (first on ties)."""
    scores = score_words(model, prompt_ids, word_token_ids(tok, words, chat))
    return words[max(range(len(words)), key=lambda i: scores[i])]


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def response(model_name: str, word: str, prompt_tokens: int, word_tokens: int, chat: bool) -> dict:
    """An OpenAI chat completion or text completion whose answer is ``word``."""
    created = int(time.time())
    if chat:
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": created,
                "model": model_name, "choices": [{"index": 0, "message": {"role": "assistant", "content": word},
                                                  "finish_reason": "stop", "logprobs": None}],
                "usage": usage(prompt_tokens, word_tokens)}
    return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": created,
            "model": model_name, "choices": [{"index": 0, "text": word, "finish_reason": "stop", "logprobs": None}],
            "usage": usage(prompt_tokens, word_tokens)}


async def stream(model_name: str, word: str, prompt_tokens: int, word_tokens: int, chat: bool,
                 include_usage: bool) -> AsyncIterator[bytes]:
    """The same answer as server-sent events: (role,) the word, the finish reason, usage if asked, DONE."""
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list[dict], extra: dict | None = None) -> bytes:
        obj = {"id": rid, "object": kind, "created": created, "model": model_name, "choices": choices, **(extra or {})}
        return b"data: " + dumps(obj) + b"\n\n"

    def choice(delta: str | None, finish: str | None, first: bool = False) -> dict:
        if chat:
            d: dict = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
            return {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
        return {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}

    if chat:
        yield event([choice(None, None, first=True)])
    yield event([choice(word, None)])
    yield event([choice(None, "stop")])
    if include_usage:
        yield event([], {"usage": usage(prompt_tokens, word_tokens)})
    yield DONE
