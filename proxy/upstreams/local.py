"""The built-in local upstream: a causal LM on CPU (SmolLM2-135M-Instruct by default, or any local
Hugging Face model directory) answering chat and text completions in OpenAI format.

This is what makes ``dpicl serve`` work offline. It is small and CPU-bound, so:

- the model is loaded lazily, once, on the first request (not at import or app start-up);
- all model work runs on one dedicated worker thread (a single-thread executor), which both keeps
  the event loop free and serialises generation, so concurrent requests queue instead of fighting
  over the 2 cores (the executor is the lock);
- ``max_tokens`` defaults to 128 and is capped (512 by default) to bound the time one request holds
  the model;
- streaming uses ``model.generate`` with a streamer that hands decoded text to the event loop;
  a closed or finished stream sets a cancel flag that stops generation at the next token.

The weights come from a loader passed in by the caller (the app passes
``aggregation.sources.local.load_model``, which also serves the DP generator), so forwarding
imports no DP code.

Requests carry private text (the client's input and DP demonstrations); nothing here logs prompts
or puts them into error messages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from proxy.upstreams import labels
from proxy.upstreams.base import DONE, Upstream, UpstreamError, dumps

DEFAULT_MAX_TOKENS = 128
#: Greedy unless the request asks otherwise: a 135M model sampled at temperature 1 (the OpenAI
#: default) drifts into gibberish within a sentence, while greedy answers stay on topic.
DEFAULT_TEMPERATURE = 0.0
MAX_STOP_SEQUENCES = 4

#: ``loader(model_dir) -> (model, tokenizer)``; ``model_dir`` None means the built-in SmolLM2.
ModelLoader = Callable[[str | None], tuple[Any, Any]]


@dataclass
class GenParams:
    """Validated sampling parameters of one request."""

    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    include_usage: bool


def _bad(message: str, param: str | None = None) -> UpstreamError:
    # ``param`` names the offending field for readers of this code; messages already name it.
    return UpstreamError(400, message, "invalid_request_error")


def _number(body: dict, key: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"{key} must be a number", key)
    if value > high or value < low or (low_open and value == low):
        raise _bad(f"{key} must be in {'(' if low_open else '['}{low:g}, {high:g}]", key)
    return float(value)


def parse_params(body: dict, cap: int) -> GenParams:
    """Validate the OpenAI sampling fields this model supports; 400 for the ones it cannot honour."""
    if body.get("n", 1) not in (1, None):
        raise _bad("the local model supports n=1 only", "n")
    raw = body.get("max_completion_tokens", body.get("max_tokens"))
    if raw is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, cap)
    elif isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise _bad("max_tokens must be a positive integer", "max_tokens")
    else:
        max_tokens = min(raw, cap)  # capped rather than refused: the cap is a serving limit
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP_SEQUENCES:
        stops = list(stop)
    else:
        raise _bad(f"stop must be a string or a list of at most {MAX_STOP_SEQUENCES} strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad("seed must be an integer", "seed")
    options = body.get("stream_options") or {}
    return GenParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", DEFAULT_TEMPERATURE, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        stop=[s for s in stops if s],
        seed=seed,
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
    )


def _message_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict) and p.get("type", "text") == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                raise _bad("the local model accepts text content only", "messages")
        return "".join(parts)
    raise _bad("message content must be a string or a list of text parts", "messages")


def chat_messages(body: dict) -> list[dict]:
    """The request's messages as ``[{"role", "content": str}]`` for a chat template."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad("each message needs a role", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _message_text(m.get("content"))})
    return out


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to (excluding) the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that could be the start of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _with_bos(tok: Any, ids: list[int]) -> list[int]:
    """``ids`` with the BOS token in front when the tokenizer puts one before text by default (as
    the model was trained) and the text does not already start with it (chat templates may)."""
    bos = getattr(tok, "bos_token_id", None)
    if bos is None or ids[:1] == [bos]:
        return ids
    with_special = list(tok("a")["input_ids"])[:1]
    adds_bos = with_special == [bos] and list(tok("a", add_special_tokens=False)["input_ids"])[:1] != [bos]
    return [int(bos)] + ids if adds_bos else ids


class LocalChatUpstream(Upstream):
    """OpenAI chat/completions served by a local causal LM (see module docstring)."""

    def __init__(self, name: str, model_dir: str | None = None, *, model: Any = None, tokenizer: Any = None,
                 max_tokens_cap: int = 512, loader: ModelLoader | None = None):
        self.name = name
        self.model_dir = model_dir
        self.loader = loader
        self.max_tokens_cap = max(1, int(max_tokens_cap))
        self._model, self._tok = model, tokenizer
        self._load_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-llm")

    # -- model work (always on the single worker thread) -------------------------------------------
    def _load(self) -> tuple[Any, Any]:
        with self._load_lock:  # once, even when the app's DP generator asks from another thread
            if self._model is None or self._tok is None:
                if self.loader is None:
                    raise UpstreamError(502, "local model unavailable: no model loader configured",
                                        "local_model_error")
                try:
                    self._model, self._tok = self.loader(self.model_dir)
                except (OSError, ValueError) as exc:  # missing package/directory: no private text involved
                    raise UpstreamError(502, f"local model unavailable: {exc}", "local_model_error") from None
            return self._model, self._tok

    def model_and_tokenizer(self) -> tuple[Any, Any]:
        """The loaded ``(model, tokenizer)``, loading them now if needed (blocking; call off the event
        loop). Lets the app's DP demonstration generator share the weights instead of loading twice."""
        return self._load()

    def _prepare(self, body: dict, chat: bool, p: GenParams) -> tuple[list[int], GenParams]:
        """Token ids of the prompt and the params with ``max_tokens`` fitted to the context window."""
        ids = self._encode(body, chat)
        limit = getattr(self._model.config, "max_position_embeddings", None)
        if limit:
            if len(ids) >= limit:
                raise _bad(f"prompt is {len(ids)} tokens; this model's context is {limit}", "messages")
            p = dataclasses.replace(p, max_tokens=min(p.max_tokens, limit - len(ids)))
        return ids, p

    def _encode(self, body: dict, chat: bool) -> list[int]:
        _, tok = self._load()
        if chat:
            messages = chat_messages(body)
            if getattr(tok, "chat_template", None):
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            else:  # a base model without a template: a plain transcript
                text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            return _with_bos(tok, list(tok(text, add_special_tokens=False)["input_ids"]))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        if not isinstance(prompt, str):
            raise _bad("prompt must be a string (one prompt per request)", "prompt")
        ids = _with_bos(tok, list(tok(prompt, add_special_tokens=False)["input_ids"]))
        return ids or [tok.bos_token_id if tok.bos_token_id is not None else (tok.eos_token_id or 0)]

    def _generate(self, ids: list[int], p: GenParams, streamer: Any = None,
                  cancel: threading.Event | None = None) -> list[int]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        model, tok = self._load()

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
                return cancel is not None and cancel.is_set()

        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if isinstance(eos, int) else 0)
        kwargs: dict[str, Any] = dict(
            input_ids=torch.tensor([ids], dtype=torch.long),
            attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
            max_new_tokens=p.max_tokens, pad_token_id=pad, eos_token_id=eos,
            stopping_criteria=StoppingCriteriaList([_Cancelled()]), streamer=streamer,
        )
        if p.temperature == 0:
            kwargs.update(do_sample=False)  # greedy
        else:
            kwargs.update(do_sample=True, temperature=p.temperature, top_p=p.top_p, top_k=0)
        if p.stop:
            kwargs.update(stop_strings=p.stop, tokenizer=tok)
        if p.seed is not None:
            torch.manual_seed(p.seed)  # safe: only this thread runs the model
        with torch.inference_mode():
            out = model.generate(**kwargs)
        return [int(t) for t in out[0, len(ids):]]

    def _eos_ids(self) -> set[int]:
        eos = self._model.generation_config.eos_token_id if self._model is not None else None
        ids = set(eos if isinstance(eos, list) else [eos]) | {getattr(self._tok, "eos_token_id", None)}
        return {int(i) for i in ids if i is not None}

    async def _run(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except UpstreamError:
            raise
        except Exception as exc:  # noqa: BLE001 - report the type only; messages could echo input
            raise UpstreamError(502, f"local model failed ({type(exc).__name__})", "local_model_error") from None

    # -- OpenAI shapes -----------------------------------------------------------------------------
    def _finish(self, new: list[int], text: str, p: GenParams) -> tuple[str, str]:
        text, stopped = cut_at_stop(text, p.stop)
        if stopped or (new and new[-1] in self._eos_ids()) or len(new) < p.max_tokens:
            return text, "stop"
        return text, "length"

    @staticmethod
    def _usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _complete(self, body: dict, chat: bool) -> dict:
        p = parse_params(body, self.max_tokens_cap)
        ids, p = await self._run(self._prepare, body, chat, p)
        cancel = threading.Event()
        try:
            new = await self._run(self._generate, ids, p, None, cancel)
        except asyncio.CancelledError:
            cancel.set()  # the client went away: stop at the next token
            raise
        text, finish = self._finish(new, self._tok.decode(new, skip_special_tokens=True), p)
        created = int(time.time())
        if chat:
            return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": created,
                    "model": self.name, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                     "finish_reason": finish, "logprobs": None}],
                    "usage": self._usage(len(ids), len(new))}
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": created,
                "model": self.name, "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
                "usage": self._usage(len(ids), len(new))}

    async def _stream(self, body: dict, chat: bool) -> AsyncIterator[bytes]:
        from transformers import TextStreamer

        p = parse_params(body, self.max_tokens_cap)
        ids, p = await self._run(self._prepare, body, chat, p)  # errors here come before the first chunk
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        counted = [0]

        class _QueueStreamer(TextStreamer):
            """Forwards finalised text to the event loop and counts generated tokens."""

            def put(self, value: Any) -> None:
                if not (self.skip_prompt and self.next_tokens_are_prompt):
                    counted[0] += int(value.numel())
                super().put(value)

            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    loop.call_soon_threadsafe(queue.put_nowait, ("text", text))

        streamer = _QueueStreamer(self._tok, skip_prompt=True, skip_special_tokens=True)

        def work() -> None:
            try:
                result = self._generate(ids, p, streamer, cancel)
                loop.call_soon_threadsafe(queue.put_nowait, ("done", result))
            except BaseException as exc:  # noqa: BLE001 - handed to the event loop
                loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))

        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        def event(delta: str | None, finish: str | None, first: bool = False) -> bytes:
            if chat:
                d: dict = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
                obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.name,
                       "choices": [{"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}]}
            else:
                obj = {"id": rid, "object": "text_completion", "created": created, "model": self.name,
                       "choices": [{"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}]}
            return b"data: " + dumps(obj) + b"\n\n"

        # ``work`` reports through the queue (it never raises), so its future needs no awaiting.
        loop.run_in_executor(self._executor, work)
        try:
            if chat:
                yield event(None, None, first=True)
            pending, finish = "", "stop"
            while True:
                kind, item = await queue.get()
                if kind == "error":
                    if isinstance(item, UpstreamError):
                        raise item
                    raise UpstreamError(502, f"local model failed ({type(item).__name__})", "local_model_error")
                if kind == "text":
                    pending += item
                    text, stopped = cut_at_stop(pending, p.stop)
                    if stopped:
                        if text:
                            yield event(text, None)
                        cancel.set()
                        break
                    # Hold back a tail that might be the start of a stop string (OpenAI omits stops).
                    keep = _held_back(pending, p.stop)
                    ready, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
                    if ready:
                        yield event(ready, None)
                else:  # done
                    if pending:
                        yield event(pending, None)
                    new: list[int] = item
                    _, finish = self._finish(new, "", p)
                    break
            yield event(None, finish)
            if p.include_usage:
                usage = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                         "created": created, "model": self.name, "choices": [],
                         "usage": self._usage(len(ids), counted[0])}
                yield b"data: " + dumps(usage) + b"\n\n"
            yield DONE
        finally:
            cancel.set()  # finished, stopped, or the client disconnected: free the model

    # -- label answers (tasks with ``answer: label``; proxy.upstreams.labels) ----------------------
    def _label(self, body: dict, words: list[str], chat: bool) -> tuple[str, int, int]:
        ids, _ = self._prepare(body, chat, parse_params(body, self.max_tokens_cap))
        word = labels.best_word(self._model, self._tok, ids, words, chat)
        return word, len(ids), len(labels.word_token_ids(self._tok, [word], chat)[0])

    async def label_answer(self, body: dict, words: list[str], chat: bool) -> dict:
        """The label word the model scores highest after the prompt, as a (chat) completion."""
        word, n_prompt, n_word = await self._run(self._label, body, words, chat)
        return labels.response(self.name, word, n_prompt, n_word, chat)

    async def label_answer_stream(self, body: dict, words: list[str], chat: bool) -> AsyncIterator[bytes]:
        """:meth:`label_answer` as a stream (errors come before the first chunk)."""
        include_usage = parse_params(body, self.max_tokens_cap).include_usage
        word, n_prompt, n_word = await self._run(self._label, body, words, chat)
        async for chunk in labels.stream(self.name, word, n_prompt, n_word, chat, include_usage):
            yield chunk

    async def chat(self, body: dict) -> dict:
        return await self._complete(body, chat=True)

    def chat_stream(self, body: dict) -> AsyncIterator[bytes]:
        return self._stream(body, chat=True)

    async def completion(self, body: dict) -> dict:
        return await self._complete(body, chat=False)

    def completion_stream(self, body: dict) -> AsyncIterator[bytes]:
        return self._stream(body, chat=False)

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
